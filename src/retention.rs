//! Retention at the receiver: a received study is destroyed when its flow's retention ends, and
//! the study's origin gets a signed destruction receipt.
//!
//! Owns: the [`Clock`] retention is judged by (the system clock in production; [`ManualClock`]
//! for tests and rehearsals, which only code holding the node can install — no environment
//! variable, flag or config key moves a node's clock); which studies have expired ([`expired`],
//! pure: records, agreements and a time in, decisions out); one sweep ([`sweep`]: finish
//! destructions a crash interrupted, destroy what expired through the store, audit each); and
//! delivering the receipts ([`deliver_receipts`]: signed with the site key, sent to the origin's
//! node by `ReportDestruction`, retried with backoff from the store's durable queue until the
//! origin acknowledges).
//!
//! Retention counts from the study's first receipt here (a re-sent or completed study does not
//! extend it). `after = "delete"` and `after = "return"` both end with nothing left here: the
//! receiver holds only de-identified copies whose source the origin keeps, so "return" is
//! settled by the receipt's study digest, which the origin checks against what it sent (the
//! origin's audit entry says whether it matches); no pseudonymised copy travels back. See
//! docs/retention.md.
//!
//! Does not own: deleting files (`store::retention`), the protocol and the origin's side
//! (`federation::destruction`), or the agreement model (`dsa`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::audit::{AuditLog, Detail, Event};
use crate::config::Peer;
use crate::dsa::AgreementSet;
use crate::federation::client::PeerClient;
use crate::federation::proto::DestructionReceipt;
use crate::federation::tls::SiteTls;
use crate::results::queue::ReturnQueue;
use crate::store::retention::{Destruction, RetentionEnded};
use crate::store::{LocalStore, Store, StoreError, StudyKey, StudyRecord};

/// Seconds in a retention day.
pub const DAY: u64 = 24 * 3600;

/// Where retention gets the time (Unix seconds).
pub trait Clock: Send + Sync {
    fn now(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> u64 {
        crate::store::outbox::now()
    }
}

/// A clock that shows what it is set to: for tests and rehearsals of retention in a process
/// that holds the node (`Node::set_clock`). Nothing outside such code can install it.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn at(unix_secs: u64) -> ManualClock {
        ManualClock(AtomicU64::new(unix_secs))
    }

    pub fn set(&self, unix_secs: u64) {
        self.0.store(unix_secs, Ordering::SeqCst);
    }

    pub fn advance(&self, secs: u64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A study whose retention ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    pub key: StudyKey,
    pub retention: RetentionEnded,
}

/// The studies of `records` received by `site` whose flow's retention (in `set`) ended by `now`.
/// A study whose agreement or flow is not in force here, or whose flow sets no retention, is
/// kept (counted in the second value, for a warning).
pub fn expired(
    records: &[StudyRecord],
    set: &AgreementSet,
    site: &str,
    now: u64,
) -> (Vec<Expired>, usize) {
    let mut out = Vec::new();
    let mut unknown = 0;
    for r in records {
        let flow = set
            .agreements
            .get(&r.agreement)
            .and_then(|a| a.flow(&r.flow))
            .filter(|f| f.to == site && f.from == r.from_site);
        let Some(flow) = flow else {
            unknown += 1;
            continue;
        };
        let Some(ret) = flow.retention else { continue };
        if now >= r.first_received.saturating_add(u64::from(ret.days) * DAY) {
            out.push(Expired {
                key: StudyKey::new(&r.agreement, &r.flow, &r.from_site, &r.study_token),
                retention: RetentionEnded {
                    days: ret.days,
                    after: ret.after.name().to_string(),
                },
            });
        }
    }
    (out, unknown)
}

/// One sweep: finishes interrupted destructions, destroys every expired study, audits each as
/// soon as it is done. A study that cannot be destroyed now is audited as such and left for the
/// next sweep; the others go on (the first such error is returned at the end).
/// Blocking (file deletions and fsyncs): run it off the async executor.
pub fn sweep(
    store: &LocalStore,
    returns: &ReturnQueue,
    set: &AgreementSet,
    site: &str,
    audit: &AuditLog,
    now: u64,
) -> Result<Vec<Destruction>, StoreError> {
    let done = store.resume_destructions()?;
    for d in &done {
        audit_destroyed(audit, d);
    }
    let mut done = done;
    let (due, unknown) = expired(&store.studies()?, set, site, now);
    if unknown > 0 {
        tracing::warn!(
            studies = unknown,
            "received studies whose agreement or flow is not in force here are kept until it is"
        );
    }
    let mut first_error = None;
    let mut refs = store.blob_refs()?;
    for e in due {
        match store.destroy_study(&e.key, &e.retention, now, &mut refs) {
            Ok(Some(d)) => {
                audit_destroyed(audit, &d);
                done.push(d);
            }
            Ok(None) => {}
            Err(err) => {
                audit.record_or_warn(Event {
                    actor: "node".into(),
                    action: "retention-delete".into(),
                    object: format!("study {} from site:{}", e.key.study_token, e.key.from_site),
                    agreement: e.key.agreement.clone(),
                    purpose: String::new(),
                    outcome: format!("failed, retried at the next sweep: {err}"),
                });
                first_error.get_or_insert(err);
            }
        }
    }
    if let Err(e) = destroy_results(store, returns, audit) {
        first_error.get_or_insert(e);
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(done),
    }
}

/// Results produced here on a destroyed study (a report waiting to go home while the origin is
/// unreachable, or refused) go with it: they are derived from the study's data. Every
/// tombstone is consulted, not only this sweep's, so a sweep a crash interrupted is finished.
fn destroy_results(
    store: &LocalStore,
    returns: &ReturnQueue,
    audit: &AuditLog,
) -> Result<(), StoreError> {
    let studies: std::collections::HashSet<(String, String, String)> = store
        .destructions()?
        .into_iter()
        .map(|(_, d)| (d.agreement, d.from_site, d.study_token))
        .collect();
    if studies.is_empty() {
        return Ok(());
    }
    for e in returns.destroy_for_studies(&studies)? {
        audit.record_detailed_or_warn(
            Event {
                actor: "node".into(),
                action: "retention-delete".into(),
                object: format!(
                    "result {} on study {} for site:{} (not yet returned)",
                    e.sop_instance_uid, e.study_token, e.origin
                ),
                agreement: e.agreement.clone(),
                purpose: e.purpose.clone(),
                outcome: "ok: deleted with its study, whose retention ended".into(),
            },
            Detail {
                study: Some(e.study_token.clone()),
                party: Some(e.origin.clone()),
                flow: Some(e.flow.clone()),
                ..Default::default()
            },
        );
        tracing::info!(agreement = %e.agreement, study = %e.study_token, origin = %e.origin, "retention ended: a result that had not gone home was deleted with its study");
    }
    Ok(())
}

fn audit_destroyed(audit: &AuditLog, d: &Destruction) {
    audit.record_detailed_or_warn(
        Event {
            actor: "node".into(),
            action: "retention-delete".into(),
            object: format!(
                "study {} from site:{} ({} instances; retention of {} days ended, then {})",
                d.study_token, d.from_site, d.instances, d.retention_days, d.after
            ),
            agreement: d.agreement.clone(),
            purpose: String::new(),
            outcome: "ok: stored copies (sealed blobs; inbox files, the one stored copy where the inbox is the delivery, with their checksum list), resumption data, PACS queue entries and index record deleted; destruction receipt queued for the origin".into(),
        },
        Detail {
            study: Some(d.study_token.clone()),
            party: Some(d.from_site.clone()),
            flow: Some(d.flow.clone()),
            instances: Some(u64::from(d.instances)),
            ..Default::default()
        },
    );
    tracing::info!(agreement = %d.agreement, study = %d.study_token, origin = %d.from_site, instances = d.instances, "retention ended: study destroyed");
}

/// The signed receipt for a destroyed study.
pub fn receipt_for(
    d: &Destruction,
    site: &str,
    key_pkcs8: &[u8],
    checkpoint: Vec<u8>,
) -> Result<DestructionReceipt, String> {
    let mut r = DestructionReceipt {
        agreement_id: d.agreement.clone(),
        flow: d.flow.clone(),
        study_token: d.study_token.clone(),
        receiver_site: site.to_string(),
        origin_site: d.from_site.clone(),
        instances_destroyed: d.instances,
        study_digest: hex::decode(&d.study_digest).map_err(|e| e.to_string())?,
        received_at: d.received_at,
        destroyed_at: d.destroyed_at,
        retention_days: d.retention_days,
        after: d.after.clone(),
        forwarded_to_site_pacs: d.forwarded_to_site_pacs,
        signature: Vec::new(),
        audit_checkpoint: Vec::new(),
    };
    crate::federation::destruction::sign(&mut r, key_pkcs8)?;
    r.audit_checkpoint = checkpoint;
    Ok(r)
}

/// The name to verify in a peer's server certificate (default: the host part of its address).
fn server_name(peer: &Peer) -> String {
    peer.server_name.clone().unwrap_or_else(|| {
        peer.address
            .rsplit_once(':')
            .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
            .unwrap_or_else(|| peer.address.clone())
    })
}

/// What delivering the due receipts achieved.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReceiptsDelivered {
    pub acknowledged: usize,
    pub pending: usize,
}

/// Sends every due destruction receipt to its origin, over one connection per origin; an
/// acknowledged one leaves the queue, a failed one is retried with backoff (an origin that
/// cannot be reached fails all its receipts of this round at once, without a connection
/// attempt each). Every outcome is audited (a failure once, at its first attempt, then again
/// when it finally goes).
pub async fn deliver_receipts(
    store: &LocalStore,
    tls: &SiteTls,
    peers: &BTreeMap<String, Peer>,
    audit: &AuditLog,
    now: u64,
) -> Result<ReceiptsDelivered, StoreError> {
    let mut out = ReceiptsDelivered::default();
    let mut by_origin: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for (tk, d) in store.receipts_due(now)? {
        by_origin
            .entry(d.from_site.clone())
            .or_default()
            .push((tk, d));
    }
    for (origin, due) in by_origin {
        let mut client = connect(&origin, tls, peers).await;
        for (tk, d) in due {
            let outcome = match &mut client {
                Ok(c) => send_one(c, &d, tls, audit).await,
                Err(e) => Err(e.clone()),
            };
            settle(store, audit, &tk, &d, outcome, now, &mut out)?;
        }
    }
    Ok(out)
}

/// Records one attempt's outcome in the queue and the audit log.
fn settle(
    store: &LocalStore,
    audit: &AuditLog,
    tk: &[u8],
    d: &Destruction,
    outcome: Result<bool, String>,
    now: u64,
    out: &mut ReceiptsDelivered,
) -> Result<(), StoreError> {
    let event = |outcome: String| Event {
        actor: "node".into(),
        action: "destruction-receipt-sent".into(),
        object: format!(
            "destruction receipt for study {} to site:{}",
            d.study_token, d.from_site
        ),
        agreement: d.agreement.clone(),
        purpose: String::new(),
        outcome,
    };
    match &outcome {
        Ok(already) => {
            out.acknowledged += 1;
            audit.record_or_warn(event(if *already {
                "ok (the origin already held it)".into()
            } else {
                "ok (the origin verified and kept it)".into()
            }));
        }
        Err(e) => {
            out.pending += 1;
            if d.receipt_attempts == 0 {
                audit.record_or_warn(event(format!("not delivered yet, retried: {e}")));
            }
            tracing::warn!(study = %d.study_token, origin = %d.from_site, error = %e, "destruction receipt not delivered; retried later");
        }
    }
    store.settle_receipt(tk, outcome.map(|_| ()), now)?;
    Ok(())
}

/// A connection to the origin `site`'s node.
async fn connect(
    site: &str,
    tls: &SiteTls,
    peers: &BTreeMap<String, Peer>,
) -> Result<PeerClient, String> {
    let peer = peers.get(site).ok_or_else(|| {
        format!(
            "no peer address is configured for site {site} (add [peers.{site}] to the node config)"
        )
    })?;
    PeerClient::connect(tls, site, &peer.address, &server_name(peer))
        .await
        .map_err(|e| e.to_string())
}

/// One attempt: `Ok(already_held)` when the origin acknowledged.
async fn send_one(
    client: &mut PeerClient,
    d: &Destruction,
    tls: &SiteTls,
    audit: &AuditLog,
) -> Result<bool, String> {
    let receipt = receipt_for(d, &tls.site_id, &tls.key_pkcs8, audit.checkpoint_for_peer())?;
    let ack = client
        .raw()
        .report_destruction(receipt)
        .await
        .map_err(|s| format!("{} refused the receipt: {}", d.from_site, s.message()))?;
    Ok(ack.into_inner().already_held)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap as Map;

    const AGREEMENT: &str = r#"
[agreement]
id = "agr"
version = 1
title = "t"
status = "active"
valid_from = 2020-01-01
valid_until = 2099-12-31
governing_law = "x"

[[parties]]
site = "a"
organisation = "A"
privacy_officer = "P"
privacy_contact = "p@a.example"

[[parties]]
site = "c"
organisation = "C"
privacy_officer = "P"
privacy_contact = "p@c.example"

[[flows]]
name = "kept"
from = "a"
to = "c"
purposes = ["treatment"]

[flows.retention]
days = 30
after = "return"

[[flows]]
name = "forever"
from = "a"
to = "c"
purposes = ["treatment"]
"#;

    fn set() -> AgreementSet {
        let a = crate::dsa::Agreement::parse("agr.toml", AGREEMENT).expect("test agreement parses");
        let mut s = AgreementSet::default();
        s.agreements.insert(a.id.clone(), a);
        s
    }

    fn record(flow: &str, from: &str, at: u64) -> StudyRecord {
        StudyRecord {
            agreement: "agr".into(),
            flow: flow.into(),
            from_site: from.into(),
            study_token: "2.25.1".into(),
            instances: Map::new(),
            expected: 0,
            first_received: at,
            last_received: at,
            patient: None,
        }
    }

    #[test]
    fn expiry_counts_days_from_the_first_receipt_per_flow() {
        let t0 = 1_000_000;
        let recs = vec![record("kept", "a", t0)];
        let (e, _) = expired(&recs, &set(), "c", t0 + 30 * DAY - 1);
        assert!(e.is_empty(), "one second early");
        let (e, _) = expired(&recs, &set(), "c", t0 + 30 * DAY);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].retention.after, "return");
        // No retention: kept; unknown flow or a sender the flow does not name: kept, counted.
        let recs = vec![
            record("forever", "a", t0),
            record("nope", "a", t0),
            record("kept", "b", t0),
        ];
        let (e, unknown) = expired(&recs, &set(), "c", u64::MAX);
        assert!(e.is_empty());
        assert_eq!(unknown, 2);
        // Only the flow's receiver enforces it.
        let (e, unknown) = expired(&[record("kept", "a", t0)], &set(), "a", u64::MAX);
        assert!(e.is_empty() && unknown == 1);
    }

    #[test]
    fn the_manual_clock_moves_only_when_told() {
        let c = ManualClock::at(5);
        c.advance(10);
        assert_eq!(c.now(), 15);
        c.set(3);
        assert_eq!(c.now(), 3);
        assert!(SystemClock.now() > 1_700_000_000);
    }
}
