//! The reconciler's error: what failed, with the API server's answer as the source.

use kube::runtime::finalizer;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed; `action` says which ("apply pod wa-x").
    #[error("{action}: {source}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
    /// Adding or removing the finalizer failed, or the work inside it did.
    #[error(transparent)]
    Finalizer(#[from] Box<finalizer::Error<Error>>),
    /// The token Secret exists but holds no usable token even after we wrote one.
    #[error("the Secret {0} holds no usable token")]
    TokenUnreadable(String),
    #[error("the session object has no namespace")]
    NoNamespace,
}

impl Error {
    /// A short, stable label for logs and Events.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Kube { .. } => "ApiError",
            Self::Finalizer(_) => "FinalizerError",
            Self::TokenUnreadable(_) => "TokenUnreadable",
            Self::NoNamespace => "NoNamespace",
        }
    }
}

/// Attaches what was being done to a kube error.
pub trait KubeContext<T> {
    fn doing(self, action: impl FnOnce() -> String) -> Result<T, Error>;
}

impl<T> KubeContext<T> for Result<T, kube::Error> {
    fn doing(self, action: impl FnOnce() -> String) -> Result<T, Error> {
        self.map_err(|source| Error::Kube {
            action: action(),
            source,
        })
    }
}

/// Whether an API error means "not found" (deleting what is gone is success).
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_not_found())
}
