//! Observed state → `WhatsAppSession.status`. Pure: the reconciler gathers what it saw
//! (the pod, the pod's last status report, a spec problem) and this decides phase,
//! message and conditions.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use wa_api::crd::{Account, condition};
use wa_api::pod::PodStatus;
use wa_api::{Phase, WhatsAppSessionStatus};

/// What the session's pod is doing, as far as the Kubernetes API tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodState {
    /// No pod object.
    Absent,
    /// Exists, not ready yet (scheduling, pulling, starting, or failing its readiness probe).
    /// `waiting` is the container's reason when it is stuck (`ImagePullBackOff`,
    /// `CrashLoopBackOff`, `CreateContainerConfigError`, …) and the kubelet's message.
    Starting { waiting: Option<(String, String)> },
    /// Ready and reachable at this IP.
    Ready { ip: IpAddr },
    /// Being deleted; a new one can only be created once it is gone.
    Terminating,
    /// Ended (`Failed`, or `Succeeded`, which for a server is a failure too).
    Failed { reason: String },
}

impl PodState {
    pub fn of(pod: Option<&Pod>) -> Self {
        let Some(pod) = pod else { return Self::Absent };
        if pod.metadata.deletion_timestamp.is_some() {
            return Self::Terminating;
        }
        let Some(status) = &pod.status else {
            return Self::Starting { waiting: None };
        };
        if let Some(phase @ ("Failed" | "Succeeded")) = status.phase.as_deref() {
            let why = [status.reason.as_deref(), status.message.as_deref()]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(": ");
            return Self::Failed {
                reason: if why.is_empty() {
                    format!("pod phase {phase}")
                } else {
                    why
                },
            };
        }
        let ready = status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        let ip = status.pod_ip.as_deref().and_then(|ip| ip.parse().ok());
        match (ready, ip) {
            (true, Some(ip)) => Self::Ready { ip },
            _ => Self::Starting {
                waiting: stuck_container(pod),
            },
        }
    }

    /// A pod that exists and is not ready yet.
    pub const STARTING: Self = Self::Starting { waiting: None };
}

/// Why the session container is waiting, unless it is just being created.
fn stuck_container(pod: &Pod) -> Option<(String, String)> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses.iter().find_map(|c| {
        let waiting = c.state.as_ref()?.waiting.as_ref()?;
        let reason = waiting.reason.clone()?;
        if matches!(reason.as_str(), "ContainerCreating" | "PodInitializing") {
            return None;
        }
        let mut message = waiting.message.clone().unwrap_or_default();
        if c.restart_count > 0 {
            if !message.is_empty() {
                message.push_str("; ");
            }
            message.push_str(&format!("restarted {} times", c.restart_count));
        }
        Some((reason, message))
    })
}

/// The latest the operator heard from the current pod over its status long poll.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PodReport {
    /// The last status the pod answered.
    pub status: Option<PodStatus>,
    /// Why the last poll failed, while it keeps failing (cleared by the next answer).
    pub error: Option<String>,
}

/// Everything the status is computed from.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    pub generation: Option<i64>,
    /// Why the spec cannot run, if it cannot.
    pub problem: Option<&'a str>,
    pub suspended: bool,
    pub pod: &'a PodState,
    pub pod_name: &'a str,
    /// The pod's report, only when it is about the pod that exists now.
    pub report: Option<&'a PodReport>,
    /// The operator's own detail (waiting for a recreate backoff, a storage change refused).
    pub note: Option<&'a str>,
}

/// The status to write. Conditions keep their `lastTransitionTime` from `previous` while
/// their status stays the same, so an unchanged observation gives an equal status and the
/// reconciler can skip the write.
pub fn session_status(
    previous: Option<&WhatsAppSessionStatus>,
    obs: &Observation<'_>,
    now: Timestamp,
) -> WhatsAppSessionStatus {
    let reported = obs.report.and_then(|r| r.status.as_ref());
    let report_error = obs.report.and_then(|r| r.error.as_deref());

    let (phase, mut message) = if let Some(problem) = obs.problem {
        (Phase::Failed, Some(problem.to_owned()))
    } else if obs.suspended {
        let msg = match obs.pod {
            PodState::Absent => "suspended; the auth volume is kept",
            _ => "suspending: stopping the session pod",
        };
        (Phase::Suspended, Some(msg.to_owned()))
    } else {
        match obs.pod {
            PodState::Absent => (Phase::Pending, Some("creating the session pod".to_owned())),
            PodState::Terminating => (
                Phase::Starting,
                Some("waiting for the previous session pod to stop".to_owned()),
            ),
            PodState::Failed { reason } => (
                Phase::Failed,
                Some(format!(
                    "the session pod failed ({reason}); it will be recreated"
                )),
            ),
            PodState::Starting { waiting: None } => (
                Phase::Starting,
                Some("the session pod is starting".to_owned()),
            ),
            PodState::Starting {
                waiting: Some((reason, detail)),
            } => (
                Phase::Starting,
                Some(if detail.is_empty() {
                    format!("the session pod is not starting: {reason}")
                } else {
                    format!("the session pod is not starting: {reason}: {detail}")
                }),
            ),
            PodState::Ready { .. } => match reported {
                Some(s) => (s.phase, pod_message(s)),
                None => (
                    Phase::Starting,
                    Some("waiting for the session pod's first status report".to_owned()),
                ),
            },
        }
    };
    if obs.problem.is_none()
        && !obs.suspended
        && let Some(err) = report_error
    {
        message = Some(match message {
            Some(m) => format!("{m}; status poll failing: {err}"),
            None => format!("status poll failing: {err}"),
        });
    }
    if let Some(note) = obs.note {
        message = Some(match message {
            Some(m) => format!("{m}; {note}"),
            None => note.to_owned(),
        });
    }

    let account: Option<Account> = match obs.report {
        Some(PodReport {
            status: Some(s), ..
        }) => s.account.clone(),
        // Not heard from this pod (yet): the account on the volume has not changed.
        _ => previous.and_then(|p| p.account.clone()),
    };

    let ready = match obs.pod {
        _ if obs.problem.is_some() => (false, "InvalidSpec"),
        _ if obs.suspended => (false, "Suspended"),
        PodState::Ready { .. } => (true, "PodReady"),
        PodState::Absent => (false, "PodMissing"),
        PodState::Starting {
            waiting: Some((reason, _)),
        } => (false, reason.as_str()),
        PodState::Starting { waiting: None } => (false, "PodStarting"),
        PodState::Terminating => (false, "PodTerminating"),
        PodState::Failed { .. } => (false, "PodFailed"),
    };
    let paired = match (&account, reported) {
        (Some(a), _) => (
            Some(true),
            "Paired".to_owned(),
            format!("linked to {}", a.jid),
        ),
        (None, Some(s)) => (
            Some(false),
            s.phase.as_str().to_owned(),
            "not linked to an account".to_owned(),
        ),
        (None, None) => (
            None,
            "NoReport".to_owned(),
            "the session pod has not reported yet".to_owned(),
        ),
    };
    let connected = phase == Phase::Connected;
    let msg = message.clone().unwrap_or_default();
    let previous_conditions = previous
        .map(|p| p.conditions.as_slice())
        .unwrap_or_default();
    let cond = |type_: &str, status: Option<bool>, reason: &str, message: &str| {
        let status = match status {
            Some(true) => "True",
            Some(false) => "False",
            None => "Unknown",
        };
        let since = previous_conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or(Time(now));
        Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message: message.to_owned(),
            last_transition_time: since,
            observed_generation: obs.generation,
        }
    };
    let conditions = vec![
        cond(condition::READY, Some(ready.0), ready.1, &msg),
        cond(condition::PAIRED, paired.0, &paired.1, &paired.2),
        cond(
            condition::CONNECTED,
            Some(connected),
            if connected {
                "Connected"
            } else {
                phase.as_str()
            },
            &msg,
        ),
    ];

    WhatsAppSessionStatus {
        phase: Some(phase),
        conditions,
        account,
        engine: reported.map(|s| s.engine),
        pod_name: (!matches!(obs.pod, PodState::Absent)).then(|| obs.pod_name.to_owned()),
        observed_generation: obs.generation,
        message,
    }
}

/// What a pod's own status says that a person needs to read.
fn pod_message(s: &PodStatus) -> Option<String> {
    if let Some(code) = &s.pair_code {
        return Some(format!(
            "enter pair code {code} on the phone (Linked devices → Link with phone number)"
        ));
    }
    if let Some(err) = &s.last_error {
        return Some(err.clone());
    }
    match s.phase {
        Phase::AwaitingScan => {
            Some("scan the QR code (gateway: GET /v1/sessions/<name>/qr)".to_owned())
        }
        Phase::LoggedOut => Some("the device was logged out; a new scan is needed".to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use serde_json::json;
    use wa_api::Engine;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn report(phase: Phase, account: Option<&str>) -> PodReport {
        PodReport {
            status: Some(PodStatus {
                session: "s".into(),
                engine: Engine::Sandbox,
                phase,
                account: account.map(|jid| Account {
                    jid: jid.into(),
                    push_name: None,
                }),
                since: Utc.timestamp_opt(0, 0).unwrap(),
                last_error: None,
                pair_code: None,
                version: 1,
            }),
            error: None,
        }
    }

    fn obs<'a>(pod: &'a PodState, report: Option<&'a PodReport>) -> Observation<'a> {
        Observation {
            generation: Some(3),
            problem: None,
            suspended: false,
            pod,
            pod_name: "wa-s",
            report,
            note: None,
        }
    }

    fn conds(s: &WhatsAppSessionStatus) -> Vec<(String, String, String)> {
        s.conditions
            .iter()
            .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
            .collect()
    }

    fn c(t: &str, s: &str, r: &str) -> (String, String, String) {
        (t.into(), s.into(), r.into())
    }

    #[test]
    fn pod_states() {
        let check = |v: serde_json::Value, want: PodState| {
            assert_eq!(PodState::of(Some(&pod(v.clone()))), want, "{v}")
        };
        assert_eq!(PodState::of(None), PodState::Absent);
        check(json!({"metadata": {}}), PodState::STARTING);
        check(
            json!({"metadata": {}, "status": {"phase": "Pending"}}),
            PodState::STARTING,
        );
        check(
            json!({"metadata": {}, "status": {"phase": "Running", "podIP": "10.0.0.7",
                   "conditions": [{"type": "Ready", "status": "False"}]}}),
            PodState::STARTING,
        );
        check(
            json!({"metadata": {}, "status": {"phase": "Running", "podIP": "10.0.0.7",
                   "conditions": [{"type": "Ready", "status": "True"}]}}),
            PodState::Ready {
                ip: "10.0.0.7".parse().unwrap(),
            },
        );
        check(
            json!({"metadata": {}, "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}),
            PodState::STARTING,
        );
        check(
            json!({"metadata": {"deletionTimestamp": "2024-01-01T00:00:00Z"}, "status": {"phase": "Running"}}),
            PodState::Terminating,
        );
        check(
            json!({"metadata": {}, "status": {"phase": "Failed", "reason": "Evicted", "message": "low memory"}}),
            PodState::Failed {
                reason: "Evicted: low memory".into(),
            },
        );
        check(
            json!({"metadata": {}, "status": {"phase": "Succeeded"}}),
            PodState::Failed {
                reason: "pod phase Succeeded".into(),
            },
        );
    }

    #[test]
    fn a_stuck_container_is_named_in_the_message_and_the_ready_reason() {
        let check = |container_status: serde_json::Value, want: Option<(&str, &str)>| {
            let p = pod(json!({"metadata": {}, "status": {"phase": "Pending",
                "containerStatuses": [container_status.clone()]}}));
            let state = PodState::of(Some(&p));
            let waiting = match &state {
                PodState::Starting { waiting } => waiting.clone(),
                other => panic!("{other:?}"),
            };
            assert_eq!(
                waiting.as_ref().map(|(r, m)| (r.as_str(), m.as_str())),
                want,
                "{container_status}"
            );
            state
        };
        let base = |state: serde_json::Value, restarts: i32| {
            json!({"name": "session", "image": "x",
            "imageID": "", "ready": false, "restartCount": restarts, "state": state})
        };
        check(
            base(json!({"waiting": {"reason": "ContainerCreating"}}), 0),
            None,
        );
        check(base(json!({"running": {}}), 0), None);
        check(
            base(
                json!({"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"x\""}}),
                0,
            ),
            Some(("ImagePullBackOff", "Back-off pulling image \"x\"")),
        );
        let crash = check(
            base(
                json!({"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}}),
                4,
            ),
            Some(("CrashLoopBackOff", "back-off 40s; restarted 4 times")),
        );
        let s = session_status(None, &obs(&crash, None), t(0));
        assert_eq!(s.phase, Some(Phase::Starting));
        assert_eq!(
            s.message.as_deref(),
            Some(
                "the session pod is not starting: CrashLoopBackOff: back-off 40s; restarted 4 times"
            )
        );
        assert_eq!(conds(&s)[0], c("Ready", "False", "CrashLoopBackOff"));
        let config = check(
            base(
                json!({"waiting": {"reason": "CreateContainerConfigError"}}),
                0,
            ),
            Some(("CreateContainerConfigError", "")),
        );
        let s = session_status(None, &obs(&config, None), t(0));
        assert_eq!(
            s.message.as_deref(),
            Some("the session pod is not starting: CreateContainerConfigError")
        );
    }

    #[test]
    fn phases_from_observations() {
        let ready = PodState::Ready {
            ip: "10.0.0.1".parse().unwrap(),
        };
        let connected = report(Phase::Connected, Some("1555@s.whatsapp.net"));
        let scan = report(Phase::AwaitingScan, None);
        let check = |o: Observation<'_>, phase: Phase, pod_name: Option<&str>| {
            let s = session_status(None, &o, t(0));
            assert_eq!(s.phase, Some(phase), "{o:?}");
            assert_eq!(s.pod_name.as_deref(), pod_name, "{o:?}");
            assert_eq!(s.observed_generation, Some(3));
            s
        };
        check(obs(&PodState::Absent, None), Phase::Pending, None);
        check(
            obs(&PodState::STARTING, None),
            Phase::Starting,
            Some("wa-s"),
        );
        check(
            obs(&PodState::Terminating, None),
            Phase::Starting,
            Some("wa-s"),
        );
        check(obs(&ready, None), Phase::Starting, Some("wa-s"));
        let s = check(obs(&ready, Some(&scan)), Phase::AwaitingScan, Some("wa-s"));
        assert!(s.message.unwrap().contains("scan the QR code"));
        let s = check(
            obs(&ready, Some(&connected)),
            Phase::Connected,
            Some("wa-s"),
        );
        assert_eq!(s.engine, Some(Engine::Sandbox));
        assert_eq!(s.account.unwrap().jid, "1555@s.whatsapp.net");
        let failed = PodState::Failed {
            reason: "Evicted".into(),
        };
        let s = check(obs(&failed, None), Phase::Failed, Some("wa-s"));
        assert!(s.message.unwrap().contains("Evicted"));
        let s = check(
            Observation {
                suspended: true,
                ..obs(&PodState::Absent, None)
            },
            Phase::Suspended,
            None,
        );
        assert_eq!(
            s.message.as_deref(),
            Some("suspended; the auth volume is kept")
        );
        check(
            Observation {
                suspended: true,
                ..obs(&ready, Some(&connected))
            },
            Phase::Suspended,
            Some("wa-s"),
        );
        let s = check(
            Observation {
                problem: Some("spec.phoneNumber: bad (INVALID_PHONE_NUMBER)"),
                ..obs(&PodState::Absent, None)
            },
            Phase::Failed,
            None,
        );
        assert_eq!(
            s.message.as_deref(),
            Some("spec.phoneNumber: bad (INVALID_PHONE_NUMBER)")
        );
    }

    #[test]
    fn conditions_follow_the_phase() {
        let ready = PodState::Ready {
            ip: "10.0.0.1".parse().unwrap(),
        };
        let connected = report(Phase::Connected, Some("1555@s.whatsapp.net"));
        let reconnecting = report(Phase::Reconnecting, Some("1555@s.whatsapp.net"));
        let scan = report(Phase::AwaitingScan, None);
        let check = |o: Observation<'_>, want: [(String, String, String); 3]| {
            assert_eq!(conds(&session_status(None, &o, t(0))), want, "{o:?}");
        };
        check(
            obs(&ready, Some(&connected)),
            [
                c("Ready", "True", "PodReady"),
                c("Paired", "True", "Paired"),
                c("Connected", "True", "Connected"),
            ],
        );
        check(
            obs(&ready, Some(&reconnecting)),
            [
                c("Ready", "True", "PodReady"),
                c("Paired", "True", "Paired"),
                c("Connected", "False", "Reconnecting"),
            ],
        );
        check(
            obs(&ready, Some(&scan)),
            [
                c("Ready", "True", "PodReady"),
                c("Paired", "False", "AwaitingScan"),
                c("Connected", "False", "AwaitingScan"),
            ],
        );
        check(
            obs(&PodState::Absent, None),
            [
                c("Ready", "False", "PodMissing"),
                c("Paired", "Unknown", "NoReport"),
                c("Connected", "False", "Pending"),
            ],
        );
        check(
            Observation {
                suspended: true,
                ..obs(&PodState::Absent, None)
            },
            [
                c("Ready", "False", "Suspended"),
                c("Paired", "Unknown", "NoReport"),
                c("Connected", "False", "Suspended"),
            ],
        );
        check(
            Observation {
                problem: Some("x"),
                ..obs(&ready, Some(&connected))
            },
            [
                c("Ready", "False", "InvalidSpec"),
                c("Paired", "True", "Paired"),
                c("Connected", "False", "Failed"),
            ],
        );
        for cond in session_status(None, &obs(&ready, Some(&connected)), t(0)).conditions {
            assert_eq!(cond.observed_generation, Some(3));
            assert_eq!(cond.last_transition_time, Time(t(0)));
        }
    }

    #[test]
    fn transition_times_only_move_on_change_so_equal_observations_give_equal_status() {
        let ready = PodState::Ready {
            ip: "10.0.0.1".parse().unwrap(),
        };
        let scan = report(Phase::AwaitingScan, None);
        let connected = report(Phase::Connected, Some("1555@s.whatsapp.net"));
        let first = session_status(None, &obs(&ready, Some(&scan)), t(0));
        let again = session_status(Some(&first), &obs(&ready, Some(&scan)), t(50));
        assert_eq!(first, again, "nothing changed, nothing to write");
        let later = session_status(Some(&first), &obs(&ready, Some(&connected)), t(60));
        let time = |s: &WhatsAppSessionStatus, ty: &str| {
            s.conditions
                .iter()
                .find(|c| c.type_ == ty)
                .unwrap()
                .last_transition_time
                .clone()
        };
        assert_eq!(time(&later, "Ready"), Time(t(0)), "Ready stayed True");
        assert_eq!(time(&later, "Connected"), Time(t(60)));
        assert_eq!(time(&later, "Paired"), Time(t(60)));
    }

    #[test]
    fn account_survives_a_pod_restart_but_not_a_logout() {
        let ready = PodState::Ready {
            ip: "10.0.0.1".parse().unwrap(),
        };
        let connected = report(Phase::Connected, Some("1555@s.whatsapp.net"));
        let before = session_status(None, &obs(&ready, Some(&connected)), t(0));
        let restarting = session_status(Some(&before), &obs(&PodState::STARTING, None), t(1));
        assert_eq!(restarting.account, before.account);
        let paired = restarting
            .conditions
            .iter()
            .find(|c| c.type_ == "Paired")
            .unwrap();
        assert_eq!(paired.status, "True");
        let logged_out = session_status(
            Some(&before),
            &obs(&ready, Some(&report(Phase::LoggedOut, None))),
            t(2),
        );
        assert_eq!(logged_out.account, None);
        assert_eq!(logged_out.phase, Some(Phase::LoggedOut));
    }

    #[test]
    fn messages_carry_pair_codes_errors_and_notes() {
        let ready = PodState::Ready {
            ip: "10.0.0.1".parse().unwrap(),
        };
        let mut pairing = report(Phase::AwaitingScan, None);
        pairing.status.as_mut().unwrap().pair_code = Some("ABCD1234".into());
        let s = session_status(None, &obs(&ready, Some(&pairing)), t(0));
        assert!(s.message.unwrap().contains("ABCD1234"));

        let failing = PodReport {
            status: None,
            error: Some("the session pod rejected the operator's token (401)".into()),
        };
        let s = session_status(None, &obs(&ready, Some(&failing)), t(0));
        assert_eq!(s.phase, Some(Phase::Starting));
        assert!(s.message.unwrap().contains("rejected the operator's token"));

        let s = session_status(
            None,
            &Observation {
                note: Some("recreating in 4s"),
                ..obs(&PodState::Absent, None)
            },
            t(0),
        );
        assert_eq!(
            s.message.as_deref(),
            Some("creating the session pod; recreating in 4s")
        );
    }
}
