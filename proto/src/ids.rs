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
                f.write_str(&hex::encode(self.0))
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
        ];
        for (input, ok) in cases {
            assert_eq!(input.parse::<JobId>().is_ok(), *ok, "{input:?}");
        }
        let id: JobId = good.parse().expect("valid");
        assert_eq!(id.to_string(), good);
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
