//! Who is calling, and may they: every server of distbuild (coordinator and
//! worker) admits each call through [`Authorize`], an interceptor that
//! names the caller ([`Caller`], from its verified certificate) and checks
//! the service's roles. Handlers that need more (a worker acting only as
//! itself, a client cancelling only its own builds) read the caller back
//! with [`caller`]. A refusal is one line: UNAUTHENTICATED when the caller
//! is not known, PERMISSION_DENIED when it is but may not do this.

use std::sync::Arc;

use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::tls::{CallerProblem, CallerVerifier, Identity, Role, Security};

/// The caller of one request, as the server knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Authentication is off (`--insecure`): anyone may do anything.
    Anyone,
    /// A verified identity.
    Known(Identity),
}

impl Caller {
    /// Whether this caller has `role`.
    pub fn has(&self, role: Role) -> bool {
        match self {
            Caller::Anyone => true,
            Caller::Known(identity) => identity.role == role,
        }
    }

    /// Refuses a caller without one of `roles` (PERMISSION_DENIED), naming
    /// `what` it tried.
    pub fn require(&self, roles: &[Role], what: &str) -> Result<(), Status> {
        if roles.iter().any(|role| self.has(*role)) {
            return Ok(());
        }
        let wanted: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
        Err(Status::permission_denied(format!(
            "{what} is for role {}; the caller is {self}",
            wanted.join(" or ")
        )))
    }

    /// Refuses a caller that may not act as worker `worker_id`: only a
    /// worker whose certificate names that ID may.
    pub fn act_as_worker(&self, worker_id: &str) -> Result<(), Status> {
        match self {
            Caller::Anyone => Ok(()),
            Caller::Known(Identity {
                role: Role::Worker,
                name,
            }) if name == worker_id => Ok(()),
            Caller::Known(Identity {
                role: Role::Worker,
                name,
            }) => Err(Status::permission_denied(format!(
                "worker {name:?} may act only as worker_id {name:?}, not {:?}",
                crate::text::shortened(worker_id, 80)
            ))),
            Caller::Known(_) => Err(Status::permission_denied(format!(
                "the worker API is for role worker; the caller is {self}"
            ))),
        }
    }

    /// The name the caller is known by, if authenticated.
    pub fn name(&self) -> Option<&str> {
        match self {
            Caller::Anyone => None,
            Caller::Known(identity) => Some(&identity.name),
        }
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Anyone => f.write_str("anyone (--insecure)"),
            Caller::Known(identity) => write!(f, "{identity}"),
        }
    }
}

/// Names the caller of a connection that has no certificate to show (a
/// simulated network): given the request's extensions, which carry the
/// connection's information.
pub type IdentifyConnection = dyn Fn(&http::Extensions) -> Option<Identity> + Send + Sync;

/// How a server learns who calls.
#[derive(Clone)]
pub enum Authenticator {
    /// Nobody is asked (`--insecure`): every caller is [`Caller::Anyone`].
    Insecure,
    /// The certificate the caller showed in the TLS handshake names it,
    /// once checked against the cluster CA.
    Certificates(CallerVerifier),
    /// The connection names the caller: the seam for a network without TLS
    /// (the simulation), so the same rules run there.
    Connection(Arc<IdentifyConnection>),
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Authenticator::Insecure => "Insecure",
            Authenticator::Certificates(_) => "Certificates",
            Authenticator::Connection(_) => "Connection",
        })
    }
}

impl Authenticator {
    /// The caller of `request`, or UNAUTHENTICATED saying what was missing.
    pub fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        match self {
            Authenticator::Insecure => Ok(Caller::Anyone),
            Authenticator::Certificates(verifier) => {
                let certs = request.peer_certs().unwrap_or_default();
                if certs.is_empty() {
                    return Err(Status::unauthenticated(
                        "no client certificate: this cluster admits only callers showing a certificate of its CA (--tls-cert, --tls-key; see `distbuild certs`)",
                    ));
                }
                match verifier.verify(&certs) {
                    Ok(identity) => Ok(Caller::Known(identity)),
                    Err(problem @ CallerProblem::NotAccepted(_)) => {
                        Err(Status::unauthenticated(problem.to_string()))
                    }
                    Err(problem @ CallerProblem::NoIdentity(_)) => {
                        Err(Status::permission_denied(problem.to_string()))
                    }
                }
            }
            Authenticator::Connection(identify) => identify(request.extensions())
                .map(Caller::Known)
                .ok_or_else(|| Status::unauthenticated("the connection names no caller")),
        }
    }
}

/// How a server admits connections (TLS or plain) and callers.
#[derive(Clone)]
pub struct Access {
    /// The server's TLS handshakes, if it speaks TLS (see
    /// [`crate::accept::tls`]).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// How it learns who calls.
    pub authenticator: Authenticator,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("tls", &self.tls.is_some())
            .field("authenticator", &self.authenticator)
            .finish()
    }
}

impl Access {
    /// What a process of `security` serves with: TLS that asks callers for
    /// a certificate of the cluster CA, who are then known by it; or plain
    /// connections that admit anyone.
    pub fn for_security(security: &Security) -> Self {
        match security {
            Security::Insecure => Self {
                tls: None,
                authenticator: Authenticator::Insecure,
            },
            Security::Tls(material) => Self {
                tls: Some(tokio_rustls::TlsAcceptor::from(material.server_config())),
                authenticator: Authenticator::Certificates(material.callers().clone()),
            },
        }
    }

    /// The interceptor admitting `service`'s callers with one of `roles`.
    pub fn authorize(&self, service: &'static str, roles: &'static [Role]) -> Authorize {
        Authorize::new(self.authenticator.clone(), service, roles)
    }
}

/// Admits a service's calls: names the caller, checks it has one of the
/// service's roles, and leaves it in the request for the handler.
#[derive(Clone, Debug)]
pub struct Authorize {
    authenticator: Authenticator,
    service: &'static str,
    roles: &'static [Role],
}

impl Authorize {
    /// Admits callers of `service` (its name, for messages) that have one
    /// of `roles`.
    pub fn new(
        authenticator: Authenticator,
        service: &'static str,
        roles: &'static [Role],
    ) -> Self {
        Self {
            authenticator,
            service,
            roles,
        }
    }
}

impl Interceptor for Authorize {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.authenticator.caller(&request)?;
        caller.require(self.roles, self.service)?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// The caller [`Authorize`] admitted `request` as. A request that did not
/// pass through it (a service wired without it) is refused, never served
/// as anyone.
pub fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| {
            Status::unauthenticated("this service admitted the call without asking who calls")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(role: Role, name: &str) -> Caller {
        Caller::Known(Identity {
            role,
            name: name.to_string(),
        })
    }

    #[test]
    fn roles_are_checked_and_named_in_the_refusal() {
        let client = known(Role::Client, "alice");
        assert!(client.require(&[Role::Client], "the client API").is_ok());
        let refused = client
            .require(&[Role::Worker], "the worker API")
            .expect_err("a client is no worker");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            refused.message(),
            "the worker API is for role worker; the caller is client \"alice\""
        );
        assert!(Caller::Anyone.require(&[Role::Admin], "membership").is_ok());
    }

    #[test]
    fn a_worker_acts_only_as_itself() {
        let worker = known(Role::Worker, "w1");
        assert!(worker.act_as_worker("w1").is_ok());
        let other = worker.act_as_worker("w2").expect_err("not its ID");
        assert_eq!(other.code(), tonic::Code::PermissionDenied);
        assert!(
            other.message().contains("not \"w2\""),
            "{}",
            other.message()
        );
        let client = known(Role::Client, "w1");
        assert_eq!(
            client.act_as_worker("w1").expect_err("no worker").code(),
            tonic::Code::PermissionDenied
        );
        assert!(Caller::Anyone.act_as_worker("anything").is_ok());
    }

    #[test]
    fn a_caller_nobody_names_is_unauthenticated() {
        let mut authorize = Authorize::new(
            Authenticator::Connection(Arc::new(|_| None)),
            "the client API",
            &[Role::Client],
        );
        let refused = authorize.call(Request::new(())).expect_err("no caller");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert_eq!(refused.message(), "the connection names no caller");
        // Nothing admitted: a handler asking finds no caller.
        assert_eq!(
            caller(&Request::new(())).expect_err("not admitted").code(),
            tonic::Code::Unauthenticated
        );
        let mut open = Authorize::new(Authenticator::Insecure, "the client API", &[Role::Client]);
        let admitted = open.call(Request::new(())).expect("insecure admits");
        assert_eq!(caller(&admitted).expect("left"), Caller::Anyone);
    }
}
