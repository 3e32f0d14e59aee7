//! End-to-end harness of wa-operator: a Kubernetes API emulator ([`apiserver`]), a pod runner
//! that plays kubelet, scheduler and volume provisioner for it ([`podrunner`]), and helpers to
//! drive both with real kubectl and real binaries ([`cluster`], [`kubectl`], [`process`]), and
//! the whole product on them ([`stack`]: gateway and operators as processes; [`census`]: never
//! two pods for one session).
//!
//! What the emulator and the runner do not do is listed in `tests/README.md`.

pub mod apiserver;
pub mod census;
pub mod cluster;
pub mod kubectl;
pub mod load;
pub mod podrunner;
pub mod process;
pub mod soak;
pub mod stack;

pub use cluster::{ControlPlaneProcess, TestCluster, TestClusterConfig};
pub use kubectl::Kubectl;
pub use stack::{Stack, StackConfig};
