//! `distbuild certs`: a cluster's certificate authority and the certificates
//! it issues (with rcgen). `certs ca` makes the CA; `certs issue` a
//! certificate whose subject names its holder's role (OU) and name (CN),
//! with the hosts it serves on for coordinators and workers. Private keys
//! are written readable by their owner only, and nothing is overwritten.
//! The local server makes a fresh set of its own at every start
//! ([`write_local_set`]).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use distbuild_proto::tls::{IdentityProblem, Role, TlsFiles, check_name};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use crate::exit_code;

/// The CA's common name.
const CA_NAME: &str = "distbuild cluster CA";
/// Default validity of a CA, in days (ten years).
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// Default validity of an issued certificate, in days.
pub const DEFAULT_DAYS: u32 = 365;
/// A certificate is valid from this long before it was made, so clocks a
/// little behind the issuer's accept it.
const BACKDATE: Duration = Duration::from_secs(3600);

/// Flags of `distbuild certs`.
#[derive(Debug, clap::Subcommand)]
pub enum CertsCommand {
    /// Creates a cluster CA: DIR/ca.pem (give it to every machine) and
    /// DIR/ca.key (keep it safe: it issues certificates).
    Ca {
        /// Directory to write ca.pem and ca.key into (created if missing).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Days the CA is valid.
        #[arg(long, default_value_t = DEFAULT_CA_DAYS)]
        days: u32,
    },
    /// Issues a certificate from the CA in DIR: DIR/NAME.pem and DIR/NAME.key.
    Issue {
        /// Directory holding ca.pem and ca.key; the certificate goes there
        /// too.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// What the holder may do: client, worker, coordinator or admin.
        #[arg(long)]
        role: String,
        /// The holder's name (a worker's is its worker ID): 1 to 64
        /// characters of [A-Za-z0-9._-].
        #[arg(long)]
        name: String,
        /// A host name or IP address the holder serves on (repeatable;
        /// coordinators and workers need at least one: the address others
        /// dial).
        #[arg(long = "host", value_name = "HOST")]
        hosts: Vec<String>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = DEFAULT_DAYS)]
        days: u32,
    },
}

/// Why certificates could not be made. One line.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// A flag is wrong.
    #[error("{0}")]
    Flag(String),
    /// The name is not a valid name.
    #[error("--name: {0}")]
    Name(IdentityProblem),
    /// A file that would be written exists.
    #[error("{} exists: remove it first (nothing is overwritten)", .0.display())]
    Exists(PathBuf),
    /// Reading or writing a file failed.
    #[error("{what} {}: {problem}", path.display())]
    Io {
        /// What was done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        problem: std::io::Error,
    },
    /// rcgen refused.
    #[error("{what}: {problem}")]
    Rcgen {
        /// What was being made.
        what: &'static str,
        /// rcgen's reason.
        problem: rcgen::Error,
    },
}

/// What one certificate is for.
#[derive(Debug, Clone)]
pub struct CertSpec {
    /// Its holder's role.
    pub role: Role,
    /// Its holder's name.
    pub name: String,
    /// Hosts it serves on (DNS names or IP addresses).
    pub hosts: Vec<String>,
    /// Valid from.
    pub not_before: SystemTime,
    /// Valid until.
    pub not_after: SystemTime,
}

impl CertSpec {
    /// A certificate valid from now (less [`BACKDATE`]) for `days`.
    pub fn for_days(role: Role, name: &str, hosts: &[String], days: u32) -> Self {
        let now = SystemTime::now();
        Self {
            role,
            name: name.to_string(),
            hosts: hosts.to_vec(),
            not_before: now - BACKDATE,
            not_after: now + Duration::from_secs(u64::from(days) * 86_400),
        }
    }
}

/// A CA in memory: its certificate (PEM) and key.
pub struct Ca {
    /// The CA certificate, PEM.
    pub cert_pem: String,
    key: KeyPair,
}

impl Ca {
    /// A new CA valid for `days`.
    pub fn generate(days: u32) -> Result<Self, CertsError> {
        let rcgen = |what| move |problem| CertsError::Rcgen { what, problem };
        let key = KeyPair::generate().map_err(rcgen("generate the CA key"))?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, CA_NAME);
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + Duration::from_secs(u64::from(days) * 86_400)).into();
        let cert = params
            .self_signed(&key)
            .map_err(rcgen("sign the CA certificate"))?;
        Ok(Self {
            cert_pem: cert.pem(),
            key,
        })
    }

    /// The CA in `dir` (`ca.pem`, `ca.key`).
    pub fn load(dir: &Path) -> Result<Self, CertsError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|problem| CertsError::Io {
                what: "read",
                path,
                problem,
            })
        };
        let cert_pem = read("ca.pem")?;
        let key_pem = read("ca.key")?;
        let key = KeyPair::from_pem(&key_pem).map_err(|problem| CertsError::Rcgen {
            what: "read ca.key",
            problem,
        })?;
        Ok(Self { cert_pem, key })
    }

    /// The CA's key, PEM (a secret).
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Issues a certificate for `spec`: its PEM and its new key's PEM.
    pub fn issue(&self, spec: &CertSpec) -> Result<(String, String), CertsError> {
        let rcgen = |what| move |problem| CertsError::Rcgen { what, problem };
        check_name(&spec.name).map_err(CertsError::Name)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)
            .map_err(rcgen("read the CA certificate"))?;
        let key = KeyPair::generate().map_err(rcgen("generate a key"))?;
        let mut params =
            CertificateParams::new(spec.hosts.clone()).map_err(rcgen("the --host names"))?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, spec.name.as_str());
        name.push(DnType::OrganizationalUnitName, spec.role.as_str());
        params.distinguished_name = name;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if !spec.hosts.is_empty() {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        params.use_authority_key_identifier_extension = true;
        params.not_before = spec.not_before.into();
        params.not_after = spec.not_after.into();
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(rcgen("sign the certificate"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// Writes `contents` to a new file `path` with `mode`; an existing file is
/// not touched.
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), CertsError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |problem: std::io::Error| {
        if problem.kind() == std::io::ErrorKind::AlreadyExists {
            CertsError::Exists(path.to_path_buf())
        } else {
            CertsError::Io {
                what: "write",
                path: path.to_path_buf(),
                problem,
            }
        }
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    file.write_all(contents.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

fn create_dir(dir: &Path) -> Result<(), CertsError> {
    std::fs::create_dir_all(dir).map_err(|problem| CertsError::Io {
        what: "create",
        path: dir.to_path_buf(),
        problem,
    })
}

/// Writes a certificate and its key as `dir/NAME.pem` and `dir/NAME.key`
/// (0600); returns the files with the CA's.
fn write_issued(
    dir: &Path,
    name: &str,
    (cert, key): (String, String),
) -> Result<TlsFiles, CertsError> {
    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    for path in [&files.cert, &files.key] {
        if path.exists() {
            return Err(CertsError::Exists(path.clone()));
        }
    }
    write_new(&files.key, &key, 0o600)?;
    write_new(&files.cert, &cert, 0o644)?;
    Ok(files)
}

/// Runs `distbuild certs`; returns the exit code.
pub fn certs_cli(command: CertsCommand) -> i32 {
    let mut err = std::io::stderr();
    let mut out = std::io::stdout();
    match run_certs(command) {
        Ok(lines) => {
            for line in lines {
                let _ = writeln!(out, "{line}");
            }
            exit_code::OK
        }
        Err(e) => crate::render::print_error(&mut err, exit_code::BAD_INPUT, e),
    }
}

/// Does what `command` asks; returns the lines to print (the files written).
pub fn run_certs(command: CertsCommand) -> Result<Vec<String>, CertsError> {
    match command {
        CertsCommand::Ca { dir, days } => {
            if days == 0 {
                return Err(CertsError::Flag("--days must be at least 1".into()));
            }
            create_dir(&dir)?;
            let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
            for path in [&cert, &key] {
                if path.exists() {
                    return Err(CertsError::Exists(path.clone()));
                }
            }
            let ca = Ca::generate(days)?;
            write_new(&key, &ca.key_pem(), 0o600)?;
            write_new(&cert, &ca.cert_pem, 0o644)?;
            Ok(vec![
                format!(
                    "wrote {} (the CA certificate: every machine needs it)",
                    cert.display()
                ),
                format!(
                    "wrote {} (the CA key: keep it private; it issues certificates)",
                    key.display()
                ),
            ])
        }
        CertsCommand::Issue {
            dir,
            role,
            name,
            hosts,
            days,
        } => {
            let role = Role::parse(&role).ok_or_else(|| {
                CertsError::Flag(format!(
                    "--role {role:?}: expected client, worker, coordinator or admin"
                ))
            })?;
            if days == 0 {
                return Err(CertsError::Flag("--days must be at least 1".into()));
            }
            check_name(&name).map_err(CertsError::Name)?;
            if hosts.is_empty() && matches!(role, Role::Coordinator | Role::Worker) {
                return Err(CertsError::Flag(format!(
                    "a {role} serves others: pass --host with each name or address they dial it by"
                )));
            }
            let ca = Ca::load(&dir)?;
            let issued = ca.issue(&CertSpec::for_days(role, &name, &hosts, days))?;
            let files = write_issued(&dir, &name, issued)?;
            Ok(vec![
                format!("wrote {} ({role} {name:?})", files.cert.display()),
                format!("wrote {} (its private key)", files.key.display()),
                format!(
                    "use: --tls-ca {} --tls-cert {} --tls-key {}",
                    files.ca.display(),
                    files.cert.display(),
                    files.key.display()
                ),
            ])
        }
    }
}

/// The certificates of a local server, made fresh at its start in `dir`
/// (inside the owner-only output base): a CA, the coordinator's and the
/// worker's (serving on 127.0.0.1) and the client's. Only a user who can
/// read `dir` can call the server. Returns the files of each.
pub struct LocalSet {
    /// The coordinator's.
    pub coordinator: TlsFiles,
    /// The worker's.
    pub worker: TlsFiles,
    /// The client's.
    pub client: TlsFiles,
}

/// The name of the local server's worker (its worker ID).
pub const LOCAL_WORKER_NAME: &str = "local";

/// The client files of the local server whose certificates are in `dir`.
pub fn local_client_files(dir: &Path) -> TlsFiles {
    TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("client.pem"),
        key: dir.join("client.key"),
    }
}

/// Replaces whatever is in `dir` with a fresh [`LocalSet`].
pub fn write_local_set(dir: &Path) -> Result<LocalSet, CertsError> {
    use std::os::unix::fs::PermissionsExt as _;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|problem| CertsError::Io {
            what: "remove",
            path: dir.to_path_buf(),
            problem,
        })?;
    }
    create_dir(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|problem| {
        CertsError::Io {
            what: "make private",
            path: dir.to_path_buf(),
            problem,
        }
    })?;
    // The set lives as long as the server: a year is past any server's
    // life (it is made again at every start).
    let ca = Ca::generate(366)?;
    write_new(&dir.join("ca.pem"), &ca.cert_pem, 0o600)?;
    let loopback = vec!["127.0.0.1".to_string()];
    let issue = |role, name: &str, hosts: &[String]| {
        let issued = ca.issue(&CertSpec::for_days(role, name, hosts, 366))?;
        write_issued(dir, name, issued)
    };
    Ok(LocalSet {
        coordinator: issue(Role::Coordinator, "coordinator", &loopback)?,
        worker: issue(Role::Worker, LOCAL_WORKER_NAME, &loopback)?,
        client: issue(Role::Client, "client", &[])?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use distbuild_proto::tls::{Identity, TlsMaterial};

    #[test]
    fn issued_certificates_name_role_and_name_and_keys_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_dir = dir.path().join("ca");
        run_certs(CertsCommand::Ca {
            dir: ca_dir.clone(),
            days: 10,
        })
        .expect("ca");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&ca_dir.join("ca.key")), 0o600);
        let lines = run_certs(CertsCommand::Issue {
            dir: ca_dir.clone(),
            role: "worker".into(),
            name: "w-1".into(),
            hosts: vec!["127.0.0.1".into(), "w1.example".into()],
            days: 5,
        })
        .expect("issue");
        assert!(lines[2].starts_with("use: --tls-ca"), "{lines:?}");
        assert_eq!(mode(&ca_dir.join("w-1.key")), 0o600);
        let material = TlsMaterial::load(&TlsFiles {
            ca: ca_dir.join("ca.pem"),
            cert: ca_dir.join("w-1.pem"),
            key: ca_dir.join("w-1.key"),
        })
        .expect("loads");
        assert_eq!(
            material.identity(),
            &Identity {
                role: Role::Worker,
                name: "w-1".into()
            }
        );
        // Nothing is overwritten; bad flags name themselves.
        let again = run_certs(CertsCommand::Issue {
            dir: ca_dir.clone(),
            role: "worker".into(),
            name: "w-1".into(),
            hosts: vec!["127.0.0.1".into()],
            days: 5,
        })
        .expect_err("exists");
        assert!(again.to_string().contains("exists"), "{again}");
        let cases = [
            ("wizard", "x", vec![], "--role \"wizard\""),
            ("client", "bad name", vec![], "--name"),
            ("coordinator", "c1", vec![], "pass --host"),
        ];
        for (role, name, hosts, want) in cases {
            let refused = run_certs(CertsCommand::Issue {
                dir: ca_dir.clone(),
                role: role.into(),
                name: name.into(),
                hosts,
                days: 5,
            })
            .expect_err("refused");
            assert!(refused.to_string().contains(want), "{refused}");
        }
        // An open key is refused by whoever loads it.
        std::fs::set_permissions(
            ca_dir.join("w-1.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        let open = TlsMaterial::load(&TlsFiles {
            ca: ca_dir.join("ca.pem"),
            cert: ca_dir.join("w-1.pem"),
            key: ca_dir.join("w-1.key"),
        })
        .expect_err("exposed");
        assert!(open.to_string().contains("chmod 600"), "{open}");
    }
}
