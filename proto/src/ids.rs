//! Identifiers and content digests: 20-byte values written as 40 lowercase
//! hex characters, as the build-graph format has them. Parsing is where they
//! are validated, once; past it, a `JobId` or `Digest` is always well-formed.

use std::fmt;
use std::str::FromStr;

use sha1::{Digest as _, Sha1};

/// Why a string is not a 40-hex identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{0:?} is not 40 lowercase hex characters")]
    NotHex(String),
    #[error("{0} bytes where a 20-byte digest was expected")]
    BadLength(usize),
    #[error("{text:?} is not a {function} hash ({chars} lowercase hex characters)")]
    NotHashHex {
        text: String,
        function: &'static str,
        chars: usize,
    },
}

fn parse_hex20(s: &str) -> Result<[u8; 20], IdError> {
    let lowercase_hex = s.len() == 40
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !lowercase_hex {
        return Err(IdError::NotHex(s.chars().take(64).collect()));
    }
    let mut out = [0u8; 20];
    hex::decode_to_slice(s, &mut out).map_err(|_| IdError::NotHex(s.to_string()))?;
    Ok(out)
}

macro_rules! hex20_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
        pub struct $name([u8; 20]);

        impl $name {
            /// The raw 20 bytes.
            pub fn as_bytes(&self) -> &[u8; 20] {
                &self.0
            }

            /// From raw bytes (already validated by their length).
            pub fn from_bytes(bytes: [u8; 20]) -> Self {
                Self(bytes)
            }
        }

        impl TryFrom<&[u8]> for $name {
            type Error = IdError;

            /// From 20 raw bytes, as they travel on the wire.
            fn try_from(bytes: &[u8]) -> Result<Self, IdError> {
                <[u8; 20]>::try_from(bytes)
                    .map(Self)
                    .map_err(|_| IdError::BadLength(bytes.len()))
            }
        }

        impl FromStr for $name {
            type Err = IdError;

            fn from_str(s: &str) -> Result<Self, IdError> {
                parse_hex20(s).map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // On the stack: IDs are written once per job and event,
                // where a `String` each would show.
                let mut hex = [0u8; 40];
                hex::encode_to_slice(self.0, &mut hex).expect("40 bytes hold 20 in hex");
                f.write_str(std::str::from_utf8(&hex).expect("hex digits are ASCII"))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self)
            }
        }
    };
}

hex20_type!(
    /// A job's ID as the build graph gives it.
    JobId
);
hex20_type!(
    /// A SHA-1 content digest: of a source file, an artifact, or a job's
    /// cache key.
    Digest
);

impl Digest {
    /// The SHA-1 of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha1::digest(bytes).into())
    }
}

/// The hash function a stored blob is named by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HashFunction {
    /// distbuild's own (sources, artifacts, cache keys), and a Remote
    /// Execution API client's that asks for it.
    Sha1,
    /// The Remote Execution API's default (Bazel's).
    Sha256,
}

impl HashFunction {
    /// Bytes of a hash.
    pub fn hash_len(self) -> usize {
        match self {
            HashFunction::Sha1 => 20,
            HashFunction::Sha256 => 32,
        }
    }

    /// The function's name, as messages show it.
    pub fn name(self) -> &'static str {
        match self {
            HashFunction::Sha1 => "SHA-1",
            HashFunction::Sha256 => "SHA-256",
        }
    }

    /// A hasher of this function.
    pub fn hasher(self) -> Hasher {
        match self {
            HashFunction::Sha1 => Hasher::Sha1(Sha1::new()),
            HashFunction::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
        }
    }

    /// The key of `bytes`' content under this function.
    pub fn key_of(self, bytes: &[u8]) -> BlobKey {
        let mut hasher = self.hasher();
        hasher.update(bytes);
        hasher.finish()
    }
}

/// Hashes content as it comes, into a [`BlobKey`].
#[derive(Debug, Clone)]
pub enum Hasher {
    Sha1(Sha1),
    Sha256(sha2::Sha256),
}

impl Hasher {
    /// Adds the next piece of content.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha1(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
        }
    }

    /// The key of everything added.
    pub fn finish(self) -> BlobKey {
        match self {
            Hasher::Sha1(h) => BlobKey::Sha1(Digest(h.finalize().into())),
            Hasher::Sha256(h) => BlobKey::Sha256(h.finalize().into()),
        }
    }
}

/// A stored blob's name: its hash function and its content's hash. The
/// content-addressed store is keyed by both, so one store holds
/// distbuild's SHA-1 blobs and Remote Execution API clients' SHA-256 ones.
/// On the wire and in tables a key is its hash's bytes, whose length (20
/// or 32) says the function; as text, lowercase hex.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum BlobKey {
    Sha1(Digest),
    Sha256([u8; 32]),
}

impl BlobKey {
    /// The function the key is a hash of.
    pub fn function(&self) -> HashFunction {
        match self {
            BlobKey::Sha1(_) => HashFunction::Sha1,
            BlobKey::Sha256(_) => HashFunction::Sha256,
        }
    }

    /// The hash's bytes (20 or 32).
    pub fn hash_bytes(&self) -> &[u8] {
        match self {
            BlobKey::Sha1(d) => d.as_bytes(),
            BlobKey::Sha256(h) => h,
        }
    }

    /// From a hash's bytes, the function told by their length.
    pub fn from_hash_bytes(bytes: &[u8]) -> Result<Self, IdError> {
        match bytes.len() {
            20 => Digest::try_from(bytes).map(BlobKey::Sha1),
            32 => Ok(BlobKey::Sha256(bytes.try_into().expect("32 bytes"))),
            n => Err(IdError::BadLength(n)),
        }
    }

    /// From lowercase hex of `function`'s length.
    pub fn parse(function: HashFunction, hex_text: &str) -> Result<Self, IdError> {
        let well_formed = hex_text.len() == function.hash_len() * 2
            && hex_text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !well_formed {
            return Err(IdError::NotHashHex {
                text: hex_text.chars().take(80).collect(),
                function: function.name(),
                chars: function.hash_len() * 2,
            });
        }
        let bytes = hex::decode(hex_text).expect("checked hex");
        Self::from_hash_bytes(&bytes)
    }

    /// The SHA-1 digest, if the key is one.
    pub fn sha1(&self) -> Option<Digest> {
        match self {
            BlobKey::Sha1(d) => Some(*d),
            BlobKey::Sha256(_) => None,
        }
    }
}

impl From<Digest> for BlobKey {
    fn from(digest: Digest) -> Self {
        BlobKey::Sha1(digest)
    }
}

impl FromStr for BlobKey {
    type Err = IdError;

    /// From 40 (SHA-1) or 64 (SHA-256) lowercase hex characters.
    fn from_str(s: &str) -> Result<Self, IdError> {
        let function = if s.len() == 64 {
            HashFunction::Sha256
        } else {
            HashFunction::Sha1
        };
        Self::parse(function, s)
    }
}

impl fmt::Display for BlobKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.hash_bytes()))
    }
}

impl fmt::Debug for BlobKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.function().name(), self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let good = "0123456789abcdef0123456789abcdef01234567";
        let cases: &[(&str, bool)] = &[
            (good, true),
            ("0123456789ABCDEF0123456789abcdef01234567", false), // uppercase
            ("0123456789abcdef0123456789abcdef0123456", false),  // 39
            ("0123456789abcdef0123456789abcdef012345678", false), // 41
            ("0123456789abcdef0123456789abcdef0123456g", false), // not hex
            ("", false),
            ("é123456789abcdef0123456789abcdef012345", false), // multibyte
            ("é123456789abcdef0123456789abcdef0123456", false), // 40 bytes
            ("g123456789abcdef0123456789abcdef01234567", false), // high nibble
            ("0123456789abcdef0123456789abcdef0123456:", false), // past '9'
            ("0123456789abcdef0123456789abcdef0123456`", false), // before 'a'
        ];
        for (input, ok) in cases {
            assert_eq!(input.parse::<JobId>().is_ok(), *ok, "{input:?}");
        }
        let id: JobId = good.parse().expect("valid");
        assert_eq!(id.to_string(), good);
    }

    #[test]
    fn every_byte_value_round_trips_through_hex() {
        for first in 0..=255u8 {
            let bytes: [u8; 20] = std::array::from_fn(|i| first.wrapping_add(i as u8 * 13));
            let text = Digest::from_bytes(bytes).to_string();
            assert_eq!(text, hex::encode(bytes));
            assert_eq!(text.parse::<Digest>(), Ok(Digest::from_bytes(bytes)));
        }
    }

    #[test]
    fn blob_keys_name_their_function_by_length() {
        // SHA-256("abc"), from FIPS 180-2.
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let key = HashFunction::Sha256.key_of(b"abc");
        assert_eq!(key.to_string(), abc);
        assert_eq!(abc.parse::<BlobKey>(), Ok(key));
        assert_eq!(
            BlobKey::from_hash_bytes(key.hash_bytes()),
            Ok(key),
            "bytes round-trip"
        );
        let sha1 = HashFunction::Sha1.key_of(b"abc");
        assert_eq!(sha1, BlobKey::Sha1(Digest::of(b"abc")));
        assert_eq!(
            BlobKey::from_hash_bytes(sha1.hash_bytes()),
            Ok(sha1),
            "bytes round-trip"
        );
        assert_eq!(
            BlobKey::from_hash_bytes(&[0; 31]),
            Err(IdError::BadLength(31))
        );
        let err = BlobKey::parse(HashFunction::Sha256, &abc[..40]).expect_err("wrong length");
        assert_eq!(
            err.to_string(),
            format!(
                "\"{}\" is not a SHA-256 hash (64 lowercase hex characters)",
                &abc[..40]
            )
        );
        assert!(BlobKey::parse(HashFunction::Sha256, &abc.to_uppercase()).is_err());
    }

    #[test]
    fn digest_of_is_sha1() {
        // SHA-1("abc"), from FIPS 180-1.
        assert_eq!(
            Digest::of(b"abc").to_string(),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
    }
}
