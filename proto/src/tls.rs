//! Transport security: the certificates a process presents and trusts, and
//! who a certificate says its holder is.
//!
//! Every certificate of a cluster is issued by the cluster's CA
//! (`distbuild certs`). Its subject names the holder: the common name (CN)
//! is the holder's name, the organizational unit (OU) its role — one of
//! `client`, `worker`, `coordinator`, `admin`. A worker's name is its
//! worker ID. Servers require a certificate of the cluster CA from every
//! caller (mutual TLS); callers check the server's against the same CA.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tonic::transport::{Certificate, ClientTlsConfig};

use crate::wire::{PrivateFileError, read_owner_only};

/// What a certificate's holder may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Submits, watches and cancels builds; uploads sources; downloads
    /// outputs.
    Client,
    /// Takes work (register, poll, heartbeat, report) as itself only, and
    /// serves and fetches artifacts.
    Worker,
    /// A replica: Raft and blob copies between coordinators.
    Coordinator,
    /// Changes membership (add-node, remove-node).
    Admin,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 4] = [Role::Client, Role::Worker, Role::Coordinator, Role::Admin];

    /// The role's name, as certificates and flags spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Worker => "worker",
            Role::Coordinator => "coordinator",
            Role::Admin => "admin",
        }
    }

    /// The role a name spells, if any.
    pub fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.as_str() == text)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who a verified certificate names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// What it may do.
    pub role: Role,
    /// Its name (a worker's is its worker ID).
    pub name: String,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.role, self.name)
    }
}

/// Longest name a certificate may give its holder.
pub const MAX_NAME_CHARS: usize = 64;

/// Whether `name` may name a certificate's holder: 1 to 64 characters of
/// `[A-Za-z0-9._-]` (a worker's name is its worker ID, which obeys the
/// same rule).
pub fn check_name(name: &str) -> Result<(), IdentityProblem> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_CHARS
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(IdentityProblem::BadName(crate::text::shortened(name, 80)))
    }
}

/// Why a certificate names no identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityProblem {
    /// Not a parsable X.509 certificate.
    #[error("not an X.509 certificate: {0}")]
    Malformed(String),
    /// No OU, or one that is not a role.
    #[error(
        "its subject's OU {0:?} is not a distbuild role (client, worker, coordinator or admin)"
    )]
    NoRole(String),
    /// No CN, or one that is not a valid name.
    #[error("its subject's CN {0:?} must be 1 to {MAX_NAME_CHARS} characters of [A-Za-z0-9._-]")]
    BadName(String),
}

/// The identity a certificate (DER) names in its subject.
pub fn identity_of(der: &[u8]) -> Result<Identity, IdentityProblem> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityProblem::Malformed(e.to_string()))?;
    let subject = cert.subject();
    let text = |attr: Option<&x509_parser::x509::AttributeTypeAndValue<'_>>| {
        attr.and_then(|a| a.as_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let unit = text(subject.iter_organizational_unit().next());
    let role = Role::parse(&unit).ok_or(IdentityProblem::NoRole(unit))?;
    let name = text(subject.iter_common_name().next());
    check_name(&name)?;
    Ok(Identity { role, name })
}

/// The files of a process's TLS material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster CA's certificate (PEM): peers must show one it issued.
    pub ca: PathBuf,
    /// This process's certificate (PEM).
    pub cert: PathBuf,
    /// This process's private key (PEM); must be private to its owner.
    pub key: PathBuf,
}

/// Why TLS material could not be used. One line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    /// A file could not be read.
    #[error("read {}: {problem}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        problem: std::io::Error,
    },
    /// The key may be read by other users: refused, as ssh refuses an
    /// open key.
    #[error(
        "private key {} may be read by other users (mode {mode:04o}): make it private, chmod 600 {}",
        path.display(),
        path.display()
    )]
    Exposed {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A file holds no PEM block of the expected kind.
    #[error("{} holds no PEM {what}", path.display())]
    NotPem {
        /// The file.
        path: PathBuf,
        /// What it should hold.
        what: &'static str,
    },
    /// The files cannot serve TLS together.
    #[error("TLS with {}, {} and {}: {problem}", cert.display(), key.display(), ca.display())]
    Unusable {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// The CA file.
        ca: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The certificate names no identity.
    #[error("certificate {}: {problem}", path.display())]
    Identity {
        /// The certificate file.
        path: PathBuf,
        /// What is wrong with it.
        problem: IdentityProblem,
    },
}

/// Reads a private key file (see [`read_owner_only`]).
fn read_key(path: &Path) -> Result<Vec<u8>, TlsFileError> {
    read_owner_only(path).map_err(|problem| match problem {
        PrivateFileError::Read(problem) => TlsFileError::Read {
            path: path.to_path_buf(),
            problem,
        },
        PrivateFileError::Exposed(mode) => TlsFileError::Exposed {
            path: path.to_path_buf(),
            mode,
        },
    })
}

/// A process's loaded TLS material: the CA it trusts, its certificate and
/// key, the identity its certificate names, and the server and caller
/// checks built from them. The key is never printed.
#[derive(Clone)]
pub struct TlsMaterial {
    ca_pem: Arc<Vec<u8>>,
    cert_pem: Arc<Vec<u8>>,
    key_pem: Arc<Vec<u8>>,
    identity: Identity,
    server: Arc<rustls::ServerConfig>,
    callers: CallerVerifier,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsMaterial({})", self.identity)
    }
}

impl TlsMaterial {
    /// Reads and checks `files`: the key private, each file PEM of its
    /// kind, the certificate naming an identity, and the three usable
    /// together by a TLS server.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsFileError> {
        use rustls::pki_types::pem::PemObject as _;
        let read = |path: &Path| {
            std::fs::read(path).map_err(|problem| TlsFileError::Read {
                path: path.to_path_buf(),
                problem,
            })
        };
        let not_pem = |path: &Path, what| TlsFileError::NotPem {
            path: path.to_path_buf(),
            what,
        };
        let key_pem = read_key(&files.key)?;
        let ca_pem = read(&files.ca)?;
        let cert_pem = read(&files.cert)?;
        let certs = |pem: &[u8]| -> Vec<CertificateDer<'static>> {
            CertificateDer::pem_slice_iter(pem)
                .filter_map(Result::ok)
                .collect()
        };
        let ca = certs(&ca_pem);
        if ca.is_empty() {
            return Err(not_pem(&files.ca, "certificate"));
        }
        let chain = certs(&cert_pem);
        let Some(leaf) = chain.first() else {
            return Err(not_pem(&files.cert, "certificate"));
        };
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|_| not_pem(&files.key, "private key"))?;
        let identity = identity_of(leaf).map_err(|problem| TlsFileError::Identity {
            path: files.cert.clone(),
            problem,
        })?;
        let unusable = |problem: String| TlsFileError::Unusable {
            cert: files.cert.clone(),
            key: files.key.clone(),
            ca: files.ca.clone(),
            problem,
        };
        // ring, as tonic's own client side uses (its `tls-ring`): rustls
        // 0.23.48 deprecates it for lacking post-quantum key exchange,
        // which only aws-lc-rs (a CMake C build) offers.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in ca {
            roots
                .add(cert)
                .map_err(|e| unusable(format!("the CA certificate: {e}")))?;
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| unusable(format!("the CA certificate: {e}")))?;
        let callers = CallerVerifier::new(verifier.clone());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| unusable(e.to_string()))?
            .with_client_cert_verifier(Arc::new(KeyHolderOnly(verifier)))
            .with_single_cert(chain, key)
            .map_err(|e| unusable(format!("certificate and key: {e}")))?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            ca_pem: Arc::new(ca_pem),
            cert_pem: Arc::new(cert_pem),
            key_pem: Arc::new(key_pem),
            identity,
            server: Arc::new(server),
            callers,
        })
    }

    /// Who this process's certificate names.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// A server's TLS settings: this certificate shown; callers asked for
    /// theirs, which the handshake checks only for possession of its key.
    /// Whether the cluster CA issued it, and it is valid now, each call
    /// checks with [`TlsMaterial::callers`], so that a refused certificate
    /// gets a gRPC status saying why rather than a broken handshake.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server.clone()
    }

    /// TLS settings for an HTTPS server with this certificate (the
    /// metrics and status page port): HTTP/1.1, no client certificate
    /// asked for (browsers and scrapers authenticate with a token).
    pub fn https_server_config(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        use rustls::pki_types::pem::PemObject as _;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&self.cert_pem)
            .filter_map(Result::ok)
            .collect();
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| e.to_string())?;
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| e.to_string())?;
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(server))
    }

    /// The check of callers' certificates against the CA.
    pub fn callers(&self) -> &CallerVerifier {
        &self.callers
    }

    /// A caller's settings: the server's certificate checked against the
    /// CA (and the address dialled), this certificate shown.
    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&*self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(
                &*self.cert_pem,
                &*self.key_pem,
            ))
            .assume_http2(true)
    }
}

/// The handshake's client check: it asks for a certificate and verifies
/// the caller's signature with its key (the caller holds that key), but
/// leaves whether the CA issued the certificate to [`CallerVerifier`] on
/// each call. A caller without a certificate may connect; its calls are
/// refused UNAUTHENTICATED.
#[derive(Debug)]
struct KeyHolderOnly(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for KeyHolderOnly {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Most verified certificates remembered (a cluster has a few hundred
/// machines; past the bound the memory starts afresh).
const MAX_REMEMBERED_CALLERS: usize = 4096;

/// Verified leaf certificates by SHA-1 of their DER: whom each names and
/// until when it is valid.
type Verified = std::collections::HashMap<[u8; 20], (Identity, UnixTime)>;

/// Checks a caller's certificate chain against the cluster CA (issuer,
/// validity now, client use) and reads the identity it names. A chain
/// once verified is remembered until its certificate expires, so a call
/// costs a hash, not a signature check.
#[derive(Clone)]
pub struct CallerVerifier {
    verifier: Arc<dyn ClientCertVerifier>,
    /// Per leaf certificate (SHA-1 of its DER): whom it names and until
    /// when it is valid.
    verified: Arc<std::sync::Mutex<Verified>>,
}

impl fmt::Debug for CallerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CallerVerifier")
    }
}

/// Why a caller's certificate is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallerProblem {
    /// Not issued by the cluster CA, expired, not for clients, ...
    #[error("the client certificate is not accepted: {0}")]
    NotAccepted(String),
    /// Accepted, but it names no identity.
    #[error("the client certificate names no distbuild identity: {0}")]
    NoIdentity(IdentityProblem),
}

impl CallerVerifier {
    fn new(verifier: Arc<dyn ClientCertVerifier>) -> Self {
        Self {
            verifier,
            verified: Arc::default(),
        }
    }

    /// The identity `chain` (leaf first) names, if the CA issued it and it
    /// is valid now.
    pub fn verify(&self, chain: &[CertificateDer<'_>]) -> Result<Identity, CallerProblem> {
        use sha1::Digest as _;
        let Some((leaf, intermediates)) = chain.split_first() else {
            return Err(CallerProblem::NotAccepted("none shown".to_string()));
        };
        let now = UnixTime::now();
        let key: [u8; 20] = sha1::Sha1::digest(leaf.as_ref()).into();
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((identity, until)) = verified.get(&key)
            && now.as_secs() <= until.as_secs()
        {
            return Ok(identity.clone());
        }
        self.verifier
            .verify_client_cert(leaf, intermediates, now)
            .map_err(|e| CallerProblem::NotAccepted(e.to_string()))?;
        let identity = identity_of(leaf).map_err(CallerProblem::NoIdentity)?;
        let until = x509_parser::parse_x509_certificate(leaf)
            .map(|(_, cert)| cert.validity().not_after.timestamp().max(0) as u64)
            .map_err(|e| CallerProblem::NotAccepted(e.to_string()))?;
        if verified.len() >= MAX_REMEMBERED_CALLERS {
            verified.clear();
        }
        verified.insert(
            key,
            (
                identity.clone(),
                UnixTime::since_unix_epoch(std::time::Duration::from_secs(until)),
            ),
        );
        Ok(identity)
    }
}

/// How a process speaks to the others.
#[derive(Debug, Clone)]
pub enum Security {
    /// Plain TCP, nobody authenticated (`--insecure`): for one trusted
    /// machine or network only.
    Insecure,
    /// Mutual TLS with the cluster's certificates.
    Tls(TlsMaterial),
}

impl Security {
    /// The settings a caller dials with, if TLS.
    pub fn client_config(&self) -> Option<ClientTlsConfig> {
        match self {
            Security::Insecure => None,
            Security::Tls(material) => Some(material.client_config()),
        }
    }

    /// This process's identity, if TLS.
    pub fn identity(&self) -> Option<&Identity> {
        match self {
            Security::Insecure => None,
            Security::Tls(material) => Some(material.identity()),
        }
    }
}

/// The flags every process (coordinator, worker, client) takes to choose
/// its [`Security`]: the three TLS files, or `--insecure`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SecurityFlags {
    /// The cluster CA's certificate (PEM): every peer must show one it
    /// issued.
    #[arg(long, value_name = "FILE", env = "DISTBUILD_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// This process's certificate (PEM), issued by the cluster CA
    /// (`distbuild certs issue`); its OU is the role, its CN the name.
    #[arg(long, value_name = "FILE", env = "DISTBUILD_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// This process's private key (PEM), readable by its owner only.
    #[arg(long, value_name = "FILE", env = "DISTBUILD_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// No TLS and no authentication: anyone who reaches the ports may do
    /// anything. Only for one trusted machine or network.
    #[arg(long)]
    pub insecure: bool,
}

impl SecurityFlags {
    /// Loads what the flags ask for: TLS from the three files (whose
    /// certificate must have one of `roles`), or insecure. Exactly one of
    /// the two must be asked for.
    pub fn load(&self, roles: &[Role]) -> Result<Security, SecurityFlagsError> {
        let (ca, cert, key) = (&self.tls_ca, &self.tls_cert, &self.tls_key);
        match (self.insecure, ca, cert, key) {
            (true, None, None, None) => Ok(Security::Insecure),
            (true, ..) => Err(SecurityFlagsError::Both),
            (false, Some(ca), Some(cert), Some(key)) => {
                let files = TlsFiles {
                    ca: ca.clone(),
                    cert: cert.clone(),
                    key: key.clone(),
                };
                let material = TlsMaterial::load(&files)?;
                if !roles.contains(&material.identity().role) {
                    let wanted: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
                    return Err(SecurityFlagsError::WrongRole {
                        path: cert.clone(),
                        identity: material.identity().clone(),
                        wanted: wanted.join(" or "),
                    });
                }
                Ok(Security::Tls(material))
            }
            (false, None, None, None) => Err(SecurityFlagsError::Neither),
            (false, ..) => Err(SecurityFlagsError::Incomplete),
        }
    }
}

/// Why the security flags cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecurityFlagsError {
    /// Neither TLS nor `--insecure`.
    #[error(
        "no TLS material: pass --tls-ca, --tls-cert and --tls-key (see `distbuild certs`), or --insecure to run without TLS and authentication on a trusted machine"
    )]
    Neither,
    /// `--insecure` with TLS files.
    #[error("--insecure cannot be combined with --tls-ca, --tls-cert or --tls-key")]
    Both,
    /// Some of the three files.
    #[error("--tls-ca, --tls-cert and --tls-key go together: pass all three")]
    Incomplete,
    /// The files could not be used.
    #[error(transparent)]
    Files(#[from] TlsFileError),
    /// The certificate is for another role.
    #[error("certificate {} names {identity}; this needs a certificate of role {wanted}", path.display())]
    WrongRole {
        /// The certificate file.
        path: PathBuf,
        /// Whom it names.
        identity: Identity,
        /// The roles that would do.
        wanted: String,
    },
}

/// The warning every process prints when it runs insecure.
pub const INSECURE_WARNING: &str = "running with --insecure: no TLS, and every caller that reaches this process's ports may do anything (submit, run commands on workers, change membership); use it only on a trusted machine or network";

/// Whether `error` (or an error behind it) is a TLS handshake refused for
/// its certificates — this side's check of the server's, or the server's
/// alert about ours (unknown CA, expired, bad signature, none shown) —
/// and if so what was refused, in one line. Retrying cannot help.
pub fn refusal(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut current = Some(error);
    while let Some(error) = current {
        let inner = error
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        // h2 keeps only the kind and text of an I/O error: a TLS alert
        // the server sent arrives as that text.
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && let Some(alert) = io.to_string().strip_prefix("received fatal alert: ")
        {
            return Some(format!("the server refused this certificate: {alert}"));
        }
        for candidate in [Some(error), inner].into_iter().flatten() {
            if let Some(tls) = candidate.downcast_ref::<rustls::Error>() {
                return match tls {
                    rustls::Error::InvalidCertificate(problem) => Some(format!(
                        "the server's certificate is not accepted: {problem:?}"
                    )),
                    rustls::Error::AlertReceived(alert) => {
                        Some(format!("the server refused this certificate: {alert:?}"))
                    }
                    rustls::Error::NoCertificatesPresented => {
                        Some("the server showed no certificate".to_string())
                    }
                    _ => None,
                };
            }
        }
        current = error.source().or(inner.and_then(|inner| inner.source()));
    }
    None
}
