//! Errors of a reconcile, each with a bounded category used as Event reason and metric label
//! (never the error's text, which may name objects).

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    #[error(transparent)]
    SecretWrite(SecretWriteError),
    #[error("IAM {operation} failed: {code}: {message}")]
    Iam { operation: &'static str, code: String, message: String },
    #[error("the resource changed while rekey acted; the step is retried from a fresh read")]
    Conflict,
    #[error("{0}")]
    Unsafe(String),
    #[error("{0}")]
    Internal(String),
    /// CreateAccessKey was refused by IAM (an answer, not a lost request): no key was created, so
    /// the write-ahead marker no longer stands for a call in flight.
    #[error(transparent)]
    NotCreated(Box<Error>),
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        match e {
            kube::Error::Api(s) if s.code == 409 => Error::Conflict,
            other => Error::Kube(other),
        }
    }
}

impl From<SecretWriteError> for Error {
    /// A write whose resourceVersion precondition failed (the Secret changed since rekey read it)
    /// is a Conflict: retried soon on a fresh read, not counted as a failure.
    fn from(e: SecretWriteError) -> Self {
        if e.code == 409 && e.reason == "Conflict" { Error::Conflict } else { Error::SecretWrite(e) }
    }
}

impl Error {
    /// Bounded: an Event reason and a metric label.
    /// Every value [`Error::category`] returns (metrics export each from the start, at 0).
    pub const CATEGORIES: [&'static str; 9] = [
        "KubeForbidden",
        "KubeError",
        "SecretWriteFailed",
        "IamAccessDenied",
        "IamThrottled",
        "IamError",
        "Conflict",
        "SafetyCheckFailed",
        "Internal",
    ];

    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 403 => "KubeForbidden",
            Error::Kube(_) => "KubeError",
            Error::SecretWrite(e) if e.code == 403 => "KubeForbidden",
            Error::SecretWrite(_) => "SecretWriteFailed",
            // HTTP403: a refusal whose body carried no readable code (seen with moto) is one all the same.
            Error::Iam { code, .. }
                if matches!(code.as_str(), "AccessDenied" | "AccessDeniedException" | "HTTP403") =>
            {
                "IamAccessDenied"
            }
            Error::Iam { code, .. } if code == "Throttling" => "IamThrottled",
            Error::Iam { .. } => "IamError",
            Error::Conflict => "Conflict",
            Error::Unsafe(_) => "SafetyCheckFailed",
            Error::Internal(_) => "Internal",
            Error::NotCreated(e) => e.category(),
        }
    }

    /// Whether IAM answered the request (a refusal such as AccessDenied or LimitExceeded), as
    /// opposed to a timeout, a lost connection or a server error, after which the call may have
    /// taken effect.
    pub fn answered(&self) -> bool {
        match self {
            Error::Iam { code, .. } => {
                !(code.starts_with("HTTP5")
                    || matches!(
                        code.as_str(),
                        "Timeout"
                            | "NotSent"
                            | "Unknown"
                            | "ServiceFailure"
                            | "ServiceFailureException"
                            | "ServiceUnavailable"
                            | "ServiceUnavailableException"
                            | "InternalFailure"
                            | "InternalError"
                            | "InternalServerError"
                            | "RequestTimeout"
                            | "RequestTimeoutException"
                    ))
            }
            _ => false,
        }
    }
}

/// A bounded word for a non-API kube error (no text from the server).
pub fn transport_kind(e: &kube::Error) -> &'static str {
    match e {
        kube::Error::Api(_) => "ApiError",
        kube::Error::HyperError(_) | kube::Error::Service(_) => "Unreachable",
        kube::Error::SerdeError(_) => "Malformed",
        _ => "ClientError",
    }
}

/// Secret write failures, summarised: admission webhooks may quote object content, so the
/// apiserver's message is never passed on.
#[derive(Debug, thiserror::Error)]
#[error("{verb} Secret {name}: {reason} (HTTP {code})")]
pub struct SecretWriteError {
    pub verb: &'static str,
    pub name: String,
    pub reason: String,
    pub code: u16,
}

pub fn summarise(verb: &'static str, name: &str, e: kube::Error) -> SecretWriteError {
    match e {
        kube::Error::Api(s) => SecretWriteError { verb, name: name.to_owned(), reason: s.reason.clone(), code: s.code },
        other => SecretWriteError { verb, name: name.to_owned(), reason: transport_kind(&other).to_owned(), code: 0 },
    }
}
