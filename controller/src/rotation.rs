//! The CA's phases and the gates between them, as a pure function of the recorded phases, the
//! operator's requests and what the cluster shows (docs/rotation.md):
//!
//! - **Prepared**: in every trust bundle, signing nothing. It becomes Active once every bundle
//!   has held it for `bundlePropagation` (kubelet has then brought it into every running pod), if
//!   it is to activate on its own (a staged rotation, the automatic renewal) or was told to.
//! - **Active**: signs every new workload certificate. Activating a CA makes the one before it
//!   Retiring, and every workload certificate it signed is re-issued.
//! - **Retiring**: signs nothing and stays in the bundles until no workload Secret holds an
//!   unexpired certificate it signed, and then `bundlePropagation` more (kubelet has then brought
//!   the re-issued certificates into the pods); then it leaves every bundle.
//!
//! A retire request skips the waits: for a Prepared CA it is dropped at once; for the Active one
//! the Prepared CA (or a new one) activates at once; a Retiring one leaves as soon as nothing it
//! signed remains in a Secret, and after `bundlePropagation` whatever remains.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use rolemesh_crds::{CaPhase, CaStatus};
use time::OffsetDateTime;

use crate::status::{from_time, to_time};

/// How often the CA is looked at while a CA is Prepared or Retiring, so that a gate is noticed
/// soon after it opens.
pub const ROTATION_POLL: Duration = Duration::from_secs(5);

/// What the operator asked for on the MTLSAuthority, the requests already handled left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Requests {
    /// A new `rolemesh.dev/ca-rotate` value.
    pub rotate: Option<String>,
    /// A new `rolemesh.dev/ca-prepare` value.
    pub prepare: Option<String>,
    /// `rolemesh.dev/ca-activate`: the fingerprint of a Prepared CA to activate.
    pub activate: Option<String>,
    /// `rolemesh.dev/ca-retire`: the fingerprint of a CA to drop now.
    pub retire: Option<String>,
}

/// What the cluster shows about each CA.
pub trait Observed: Sync {
    /// Whether every trust bundle ConfigMap the controller keeps holds the CA.
    fn in_every_bundle(&self, ca: &CaStatus) -> bool;
    /// How many workload Secrets hold an unexpired certificate the CA signed.
    fn certificates_signed(&self, ca: &CaStatus) -> usize;
}

/// A CA to make, and the phase it starts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewCa {
    /// A staged rotation starts: into the bundles first.
    Prepared { auto_activate: bool },
    /// The Active CA is retired with nothing prepared: the new one must sign at once.
    Active,
}

/// The phases after this pass, and the CA to make, if any.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub cas: Vec<CaStatus>,
    pub new_ca: Option<NewCa>,
    /// Whether a phase changed or a CA left (the bundles and the signing CA must be re-read).
    pub changed: bool,
}

impl Plan {
    /// How soon the CA should be looked at again.
    pub fn next_look(&self, otherwise: Duration) -> Duration {
        if self.cas.iter().any(|ca| ca.phase != CaPhase::Active) {
            ROTATION_POLL.min(otherwise)
        } else {
            otherwise
        }
    }
}

fn elapsed(since: &Time, now: OffsetDateTime, wait: Duration) -> bool {
    now - from_time(since) >= wait
}

/// The Prepared CA becomes Active and the Active one Retiring.
fn promote(cas: &mut [CaStatus], now: OffsetDateTime) {
    for ca in cas.iter_mut() {
        match ca.phase {
            CaPhase::Active => {
                ca.phase = CaPhase::Retiring;
                ca.since = to_time(now);
                ca.settled_at = None;
            }
            CaPhase::Prepared => {
                ca.phase = CaPhase::Active;
                ca.since = to_time(now);
                ca.settled_at = None;
                ca.auto_activate = false;
            }
            CaPhase::Retiring => {}
        }
    }
}

/// Moves the CAs on. `renewal_due`: the Active CA is in the part of its life where it is
/// replaced on its own; `staged`: rolemesh makes its CAs (no user CA), so new ones can be
/// prepared.
pub fn plan(
    recorded: &[CaStatus],
    requests: &Requests,
    observed: &dyn Observed,
    renewal_due: bool,
    staged: bool,
    propagation: Duration,
    now: OffsetDateTime,
) -> Plan {
    let mut cas = recorded.to_vec();
    let mut new_ca = None;
    let mut changed = false;
    let has = |cas: &[CaStatus], phase| cas.iter().any(|ca| ca.phase == phase);
    let phase_of = |cas: &[CaStatus], fingerprint: &str| {
        cas.iter()
            .find(|ca| ca.fingerprint == fingerprint)
            .map(|ca| ca.phase)
    };

    if let Some(fingerprint) = &requests.retire {
        match phase_of(&cas, fingerprint) {
            Some(CaPhase::Prepared) => {
                cas.retain(|ca| &ca.fingerprint != fingerprint);
                changed = true;
            }
            Some(CaPhase::Active) if has(&cas, CaPhase::Prepared) => {
                promote(&mut cas, now);
                changed = true;
            }
            Some(CaPhase::Active) if staged => new_ca = Some(NewCa::Active),
            _ => {}
        }
    }
    if staged && new_ca.is_none() {
        let prepared = cas.iter_mut().find(|ca| ca.phase == CaPhase::Prepared);
        match prepared {
            Some(prepared)
                if requests.rotate.is_some()
                    || requests.activate.as_ref() == Some(&prepared.fingerprint) =>
            {
                prepared.auto_activate = true;
            }
            Some(_) => {}
            None if requests.rotate.is_some() || renewal_due => {
                new_ca = Some(NewCa::Prepared {
                    auto_activate: true,
                })
            }
            None if requests.prepare.is_some() => {
                new_ca = Some(NewCa::Prepared {
                    auto_activate: false,
                })
            }
            None => {}
        }
    }

    let mut activate = false;
    for ca in cas.iter_mut() {
        match ca.phase {
            CaPhase::Prepared => {
                if observed.in_every_bundle(ca) {
                    ca.settled_at.get_or_insert_with(|| to_time(now));
                } else {
                    ca.settled_at = None;
                }
                activate = ca.auto_activate
                    && ca
                        .settled_at
                        .as_ref()
                        .is_some_and(|at| elapsed(at, now, propagation));
            }
            CaPhase::Retiring => {
                if observed.certificates_signed(ca) == 0 {
                    ca.settled_at.get_or_insert_with(|| to_time(now));
                } else {
                    ca.settled_at = None;
                }
            }
            CaPhase::Active => {}
        }
    }
    let before = cas.len();
    cas.retain(|ca| {
        if ca.phase != CaPhase::Retiring {
            return true;
        }
        let now_asked = requests.retire.as_ref() == Some(&ca.fingerprint);
        let settled = ca.settled_at.as_ref();
        let done = match settled {
            Some(at) => now_asked || elapsed(at, now, propagation),
            // Asked to go now, it does not wait for ever on a Secret that cannot be re-issued.
            None => now_asked && elapsed(&ca.since, now, propagation),
        };
        !done
    });
    changed |= cas.len() != before;
    if activate {
        promote(&mut cas, now);
        changed = true;
    }
    Plan {
        cas,
        new_ca,
        changed,
    }
}

/// When the Active CA is renewed on its own: at the start of the last third of its life, or
/// earlier when what is left then would be less than three propagation waits (a staged rotation
/// needs two, and the re-issue between them).
pub fn renewal_time(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    propagation: Duration,
) -> OffsetDateTime {
    let life: time::Duration = not_after - not_before;
    let floor = time::Duration::try_from(propagation * 3).unwrap_or(time::Duration::ZERO);
    let third: time::Duration = life / 3;
    not_after - third.max(floor)
}

/// Whether the Active CA should be renewed on its own now ([`renewal_time`]).
pub fn renewal_due(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    propagation: Duration,
    now: OffsetDateTime,
) -> bool {
    now >= renewal_time(not_before, not_after, propagation)
}

/// How soon to look at the CA again: `otherwise`, but no later than the renewal time of the
/// Active CA (a renewal noticed late may not have the time its two waits need).
pub fn next_look(
    otherwise: Duration,
    renewal_at: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> Duration {
    match renewal_at {
        Some(at) if at > now => {
            let until = Duration::try_from(at - now).unwrap_or(otherwise);
            // A second past it, so that the look finds it due.
            otherwise.min(until + Duration::from_secs(1))
        }
        _ => otherwise,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const WAIT: Duration = Duration::from_secs(120);

    fn at(seconds: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000 + seconds).expect("time")
    }

    fn ca(fingerprint: &str, phase: CaPhase, since: i64) -> CaStatus {
        CaStatus {
            fingerprint: fingerprint.into(),
            phase,
            subject: format!("CN=rolemesh CA {fingerprint}"),
            not_after: to_time(at(1_000_000)),
            since: to_time(at(since)),
            settled_at: None,
            auto_activate: false,
        }
    }

    /// Which CAs the bundles hold, and how many certificates each CA still has in Secrets.
    #[derive(Default)]
    struct Cluster {
        bundles: Vec<&'static str>,
        signed: BTreeMap<&'static str, usize>,
    }

    impl Observed for Cluster {
        fn in_every_bundle(&self, ca: &CaStatus) -> bool {
            self.bundles.contains(&ca.fingerprint.as_str())
        }
        fn certificates_signed(&self, ca: &CaStatus) -> usize {
            self.signed
                .get(ca.fingerprint.as_str())
                .copied()
                .unwrap_or(0)
        }
    }

    fn phases(plan: &Plan) -> Vec<(String, CaPhase)> {
        plan.cas
            .iter()
            .map(|ca| (ca.fingerprint.clone(), ca.phase))
            .collect()
    }

    fn run(cas: &[CaStatus], requests: &Requests, cluster: &Cluster, now: i64) -> Plan {
        plan(cas, requests, cluster, false, true, WAIT, at(now))
    }

    /// The whole staged rotation: prepared, held back until every bundle has had it for the
    /// propagation wait, activated, and the old CA kept until its certificates are replaced and
    /// kubelet had time to deliver them.
    #[test]
    fn a_staged_rotation_waits_for_each_gate() {
        let rotate = Requests {
            rotate: Some("1".into()),
            ..Default::default()
        };
        let quiet = Requests::default();
        let old = ca("old", CaPhase::Active, 0);
        let cluster = Cluster::default();
        let first = run(std::slice::from_ref(&old), &rotate, &cluster, 10);
        assert_eq!(
            first.new_ca,
            Some(NewCa::Prepared {
                auto_activate: true
            })
        );
        let mut new = ca("new", CaPhase::Prepared, 10);
        new.auto_activate = true;
        let cas = vec![old.clone(), new];

        // Not yet in every bundle: nothing moves, however long.
        let waiting = run(&cas, &quiet, &cluster, 10_000);
        assert_eq!(waiting.new_ca, None);
        assert!(!waiting.changed);
        assert_eq!(waiting.cas[1].settled_at, None);

        // In every bundle from t=20: active only 120 s later.
        let everywhere = Cluster {
            bundles: vec!["old", "new"],
            signed: BTreeMap::from([("old", 3)]),
        };
        let settled = run(&cas, &quiet, &everywhere, 20);
        assert_eq!(settled.cas[1].settled_at, Some(to_time(at(20))));
        assert!(!settled.changed);
        let early = run(&settled.cas, &quiet, &everywhere, 139);
        assert_eq!(phases(&early)[1].1, CaPhase::Prepared);
        let activated = run(&settled.cas, &quiet, &everywhere, 140);
        assert!(activated.changed);
        assert_eq!(
            phases(&activated),
            vec![
                ("old".into(), CaPhase::Retiring),
                ("new".into(), CaPhase::Active)
            ]
        );
        assert_eq!(activated.next_look(WAIT * 10), ROTATION_POLL);

        // The old CA stays while a Secret holds what it signed, then the propagation wait.
        let still_used = run(&activated.cas, &quiet, &everywhere, 10_000);
        assert_eq!(still_used.cas.len(), 2);
        let replaced = Cluster {
            bundles: vec!["old", "new"],
            signed: BTreeMap::new(),
        };
        let last_replaced = run(&activated.cas, &quiet, &replaced, 200);
        assert_eq!(last_replaced.cas.len(), 2);
        let kept = run(&last_replaced.cas, &quiet, &replaced, 319);
        assert_eq!(kept.cas.len(), 2);
        let retired = run(&last_replaced.cas, &quiet, &replaced, 320);
        assert!(retired.changed);
        assert_eq!(phases(&retired), vec![("new".into(), CaPhase::Active)]);
        assert_eq!(retired.next_look(WAIT * 10), WAIT * 10);
    }

    /// A CA prepared by `ca prepare` waits for `ca activate`, and the gate still applies then.
    #[test]
    fn a_prepared_ca_activates_only_when_told() {
        let prepare = Requests {
            prepare: Some("p".into()),
            ..Default::default()
        };
        let old = ca("old", CaPhase::Active, 0);
        let cluster = Cluster {
            bundles: vec!["old", "new"],
            ..Default::default()
        };
        assert_eq!(
            run(std::slice::from_ref(&old), &prepare, &cluster, 0).new_ca,
            Some(NewCa::Prepared {
                auto_activate: false
            })
        );
        let cas = vec![old, ca("new", CaPhase::Prepared, 0)];
        let settled = run(&cas, &Requests::default(), &cluster, 0);
        let untold = run(&settled.cas, &Requests::default(), &cluster, 100_000);
        assert_eq!(untold.cas[1].phase, CaPhase::Prepared);
        let activate = Requests {
            activate: Some("new".into()),
            ..Default::default()
        };
        let told = run(&settled.cas, &activate, &cluster, 100_000);
        assert_eq!(told.cas[1].phase, CaPhase::Active);
        // Told before the gate opened, it waits for it.
        let fresh = run(&cas, &activate, &cluster, 5);
        assert_eq!(fresh.cas[1].phase, CaPhase::Prepared);
        assert!(fresh.cas[1].auto_activate);
    }

    /// Retiring skips the waits: the Active CA is replaced at once (by the prepared one when
    /// there is one), and leaves as soon as its certificates are re-issued, or after the
    /// propagation wait whatever remains.
    #[test]
    fn retiring_the_active_ca_replaces_it_at_once() {
        let retire_old = Requests {
            retire: Some("old".into()),
            ..Default::default()
        };
        let old = ca("old", CaPhase::Active, 0);
        let cluster = Cluster::default();
        assert_eq!(
            run(std::slice::from_ref(&old), &retire_old, &cluster, 5).new_ca,
            Some(NewCa::Active)
        );
        let with_prepared = vec![old.clone(), ca("next", CaPhase::Prepared, 1)];
        let in_use = Cluster {
            signed: BTreeMap::from([("old", 1)]),
            ..Default::default()
        };
        let promoted = run(&with_prepared, &retire_old, &in_use, 2);
        assert_eq!(
            phases(&promoted),
            vec![
                ("old".into(), CaPhase::Retiring),
                ("next".into(), CaPhase::Active)
            ]
        );
        // Retiring and asked to go: gone once nothing it signed is left, without the wait.
        let retiring = vec![
            ca("old", CaPhase::Retiring, 100),
            ca("new", CaPhase::Active, 100),
        ];
        assert_eq!(run(&retiring, &retire_old, &in_use, 150).cas.len(), 2);
        assert_eq!(run(&retiring, &retire_old, &cluster, 101).cas.len(), 1);
        // A Secret that is never re-issued holds it back for one propagation wait at most.
        assert_eq!(run(&retiring, &retire_old, &in_use, 220).cas.len(), 1);
        // Retiring a prepared CA drops it.
        let retire_next = Requests {
            retire: Some("next".into()),
            ..Default::default()
        };
        assert_eq!(
            phases(&run(&with_prepared, &retire_next, &cluster, 2)),
            vec![("old".into(), CaPhase::Active)]
        );
    }

    /// With a user's CA nothing is prepared or renewed here (the user names the CA), but a CA
    /// the user replaced still retires through the gates.
    #[test]
    fn a_user_ca_is_never_prepared_but_the_replaced_one_retires() {
        let rotate = Requests {
            rotate: Some("1".into()),
            retire: Some("user".into()),
            ..Default::default()
        };
        let cas = vec![
            ca("user", CaPhase::Active, 0),
            ca("before", CaPhase::Retiring, 0),
        ];
        let cluster = Cluster::default();
        let plan = plan(&cas, &rotate, &cluster, true, false, WAIT, at(1));
        assert_eq!(plan.new_ca, None);
        assert_eq!(plan.cas.len(), 2);
        let later = super::plan(&plan.cas, &rotate, &cluster, true, false, WAIT, at(121));
        assert_eq!(phases(&later), vec![("user".into(), CaPhase::Active)]);
    }

    /// The CA is looked at again no later than its renewal time, so a short-lived CA is not
    /// noticed late (the recheck every few minutes alone would).
    #[test]
    fn the_next_look_is_no_later_than_the_renewal() {
        let start = at(0);
        let renewal = renewal_time(start, start + time::Duration::minutes(10), WAIT);
        assert_eq!(renewal, start + time::Duration::minutes(4));
        let recheck = Duration::from_secs(300);
        assert_eq!(
            next_look(recheck, Some(renewal), start + time::Duration::minutes(2)),
            Duration::from_secs(121)
        );
        assert_eq!(
            next_look(recheck, Some(renewal), start),
            Duration::from_secs(241)
        );
        let year = renewal_time(start, start + time::Duration::days(365), WAIT);
        assert_eq!(next_look(recheck, Some(year), start), recheck);
        assert_eq!(next_look(recheck, Some(renewal), renewal), recheck);
        assert_eq!(next_look(recheck, None, start), recheck);
    }

    #[test]
    fn renewal_is_due_in_the_last_third_or_before_two_waits_no_longer_fit() {
        let start = at(0);
        let year = time::Duration::days(365);
        // (case, life, elapsed, due)
        let rows = [
            ("young", year, time::Duration::days(200), false),
            ("last third", year, time::Duration::days(244), true),
            (
                "short life, first minute",
                time::Duration::minutes(10),
                time::Duration::minutes(1),
                false,
            ),
            (
                "short life, six minutes left",
                time::Duration::minutes(10),
                time::Duration::minutes(4),
                true,
            ),
        ];
        for (case, life, elapsed, due) in rows {
            assert_eq!(
                renewal_due(start, start + life, WAIT, start + elapsed),
                due,
                "{case}"
            );
        }
    }
}
