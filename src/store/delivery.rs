//! The durable queue of received instances waiting to be forwarded to the site's own PACS.
//!
//! Owns: one sled tree (`deliver`) in the store's index database. [`LocalStore::commit`] adds an
//! entry for every instance a study gains, in the same flush that records the study, so an
//! instance acknowledged to the sending site is also queued for the PACS: a crash can lose
//! neither without the other. Entries are keyed by a monotonic id (oldest first) and hold only
//! tokens, pseudonymous UIDs and the blob's SHA-256 — never PHI. An entry leaves the queue when
//! the PACS confirms it; it is marked failed (and kept, with its reason, for an operator) after
//! the PACS refused it too often.
//!
//! Delivery is at least once: an instance the PACS confirmed just before a crash, whose removal
//! was not yet flushed, is sent again after the restart (a PACS keeps one copy per SOP Instance
//! UID).
//!
//! Does not own: the DICOM association (`dicom_net::deliver`) or the retry policy's numbers
//! (`[dicom.deliver]` in the node config).
//!
//! [`LocalStore::commit`]: super::LocalStore

use serde::{Deserialize, Serialize};

use super::StoreError;

/// Where a queued instance stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeliveryState {
    /// Waiting for (the next attempt of) its delivery.
    Pending,
    /// Refused by the PACS too often or unreadable: kept for an operator, not retried.
    Failed,
}

/// One instance waiting for delivery to the PACS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedInstance {
    /// SHA-256 (hex) of the stored instance (its blob).
    pub sha256: String,
    /// De-identified SOP Instance UID.
    pub sop_instance_uid: String,
    pub agreement: String,
    pub from_site: String,
    pub study_token: String,
    /// Unix milliseconds when it was queued.
    pub queued_at: u64,
    /// Attempts the PACS answered with a failure (or refused the presentation context).
    pub attempts: u32,
    /// Unix milliseconds of the earliest next attempt.
    pub next_attempt: u64,
    pub last_error: Option<String>,
    pub state: DeliveryState,
}

/// Position of an entry in the queue.
pub type QueueKey = [u8; 8];

/// The delivery queue (cheap to clone: a handle on the store's database).
#[derive(Clone)]
pub struct DeliveryQueue {
    db: sled::Db,
    tree: sled::Tree,
    /// Wakes the delivery worker when an instance is queued.
    woken: std::sync::Arc<tokio::sync::Notify>,
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn decode(v: &[u8]) -> Result<QueuedInstance, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt(format!("delivery queue: {e}")))
}

fn encode(q: &QueuedInstance) -> Vec<u8> {
    serde_json::to_vec(q).expect("queue entry serialises")
}

impl DeliveryQueue {
    pub(super) fn open(db: &sled::Db) -> Result<DeliveryQueue, StoreError> {
        Ok(DeliveryQueue {
            db: db.clone(),
            tree: db.open_tree("deliver")?,
            woken: Default::default(),
        })
    }

    /// Adds an instance (not flushed: the caller flushes with the record it belongs to).
    pub(super) fn push(
        &self,
        key: &super::StudyKey,
        sop_instance_uid: &str,
        sha256_hex: &str,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let entry = QueuedInstance {
            sha256: sha256_hex.to_string(),
            sop_instance_uid: sop_instance_uid.to_string(),
            agreement: key.agreement.clone(),
            from_site: key.from_site.clone(),
            study_token: key.study_token.clone(),
            queued_at: now,
            attempts: 0,
            next_attempt: 0,
            last_error: None,
            state: DeliveryState::Pending,
        };
        let id = self.db.generate_id()?;
        self.tree.insert(id.to_be_bytes(), encode(&entry))?;
        self.woken.notify_one();
        Ok(())
    }

    /// Up to `limit` pending entries due at `now` (unix ms), oldest first.
    pub fn due(
        &self,
        now: u64,
        limit: usize,
    ) -> Result<Vec<(QueueKey, QueuedInstance)>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.iter() {
            let (k, v) = item?;
            let q = decode(&v)?;
            if q.state == DeliveryState::Pending && q.next_attempt <= now {
                out.push((key_of(&k)?, q));
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The earliest next attempt (unix ms) of any pending entry.
    pub fn next_due(&self) -> Result<Option<u64>, StoreError> {
        let mut next: Option<u64> = None;
        for item in self.tree.iter() {
            let q = decode(&item?.1)?;
            if q.state == DeliveryState::Pending {
                next = Some(next.map_or(q.next_attempt, |n| n.min(q.next_attempt)));
            }
        }
        Ok(next)
    }

    /// Every entry (pending and failed), oldest first.
    pub fn entries(&self) -> Result<Vec<(QueueKey, QueuedInstance)>, StoreError> {
        self.tree
            .iter()
            .map(|item| {
                let (k, v) = item?;
                Ok((key_of(&k)?, decode(&v)?))
            })
            .collect()
    }

    /// Applies the outcomes of one association at once, then flushes: delivered entries leave
    /// the queue, the others are stored as given (next attempt, error, state).
    pub fn settle(
        &self,
        delivered: &[QueueKey],
        updated: &[(QueueKey, QueuedInstance)],
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for k in delivered {
            batch.remove(k.as_slice());
        }
        for (k, q) in updated {
            batch.insert(k.as_slice(), encode(q));
        }
        self.tree.apply_batch(batch)?;
        self.db.flush()?;
        Ok(())
    }

    /// Removes every entry of one study (its retention ended), then flushes.
    pub(super) fn remove_study(&self, key: &super::StudyKey) -> Result<usize, StoreError> {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for (k, q) in self.entries()? {
            if q.agreement == key.agreement
                && q.from_site == key.from_site
                && q.study_token == key.study_token
            {
                batch.remove(k.as_slice());
                n += 1;
            }
        }
        if n > 0 {
            self.tree.apply_batch(batch)?;
            self.db.flush()?;
        }
        Ok(n)
    }

    /// Puts every failed entry back in line for an attempt now; returns how many.
    pub fn retry_failed(&self) -> Result<usize, StoreError> {
        let mut again = Vec::new();
        for (k, mut q) in self.entries()? {
            if q.state == DeliveryState::Failed {
                q.state = DeliveryState::Pending;
                q.attempts = 0;
                q.next_attempt = 0;
                again.push((k, q));
            }
        }
        self.settle(&[], &again)?;
        Ok(again.len())
    }

    /// Notified when an instance is queued (a permit is kept if nobody is waiting).
    pub fn woken(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.woken.clone()
    }
}

fn key_of(k: &[u8]) -> Result<QueueKey, StoreError> {
    k.try_into()
        .map_err(|_| StoreError::Corrupt("delivery queue: malformed key".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{LocalStore, StagedInstance, Store, StudyKey};
    use sha2::{Digest, Sha256};
    use std::io::Write;

    fn stage(store: &LocalStore, bytes: &[u8], uid: &str) -> StagedInstance {
        let (mut f, path) = store.stage_file().unwrap();
        f.write_all(bytes).unwrap();
        StagedInstance {
            path,
            sha256: Sha256::digest(bytes).into(),
            size: bytes.len() as u64,
            sop_instance_uid: uid.into(),
        }
    }

    fn key() -> StudyKey {
        StudyKey::new("a", "f", "x", "2.25.1")
    }

    #[test]
    fn nothing_is_queued_unless_pacs_delivery_is_on() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        s.commit(&key(), 1, vec![stage(&s, b"one", "2.25.11")], vec![])
            .unwrap();
        assert!(s.delivery_queue().entries().unwrap().is_empty());
    }

    #[test]
    fn commits_queue_each_new_instance_once_durably() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = LocalStore::open(dir.path()).unwrap();
            let q = s.enable_pacs_delivery();
            s.commit(&key(), 2, vec![stage(&s, b"one", "2.25.11")], vec![])
                .unwrap();
            // The same study again (a re-send) and one more instance: only the new one is queued.
            let again = vec![stage(&s, b"one", "2.25.11"), stage(&s, b"two", "2.25.12")];
            s.commit(&key(), 2, again, vec![]).unwrap();
            assert_eq!(q.entries().unwrap().len(), 2);
        }
        let s = LocalStore::open(dir.path()).unwrap();
        let q = s.delivery_queue();
        let due = q.due(now_ms(), 10).unwrap();
        let uids: Vec<_> = due
            .iter()
            .map(|(_, e)| e.sop_instance_uid.as_str())
            .collect();
        assert_eq!(uids, ["2.25.11", "2.25.12"], "oldest first, after a reopen");
        assert_eq!(due[0].1.study_token, "2.25.1");

        // One delivered, one retried later, then failed for good and put back by an operator.
        let (k0, _) = due[0].clone();
        let (k1, mut e1) = due[1].clone();
        e1.attempts = 1;
        e1.next_attempt = now_ms() + 60_000;
        q.settle(&[k0], &[(k1, e1.clone())]).unwrap();
        assert!(q.due(now_ms(), 10).unwrap().is_empty(), "not due yet");
        assert_eq!(q.next_due().unwrap(), Some(e1.next_attempt));
        e1.state = DeliveryState::Failed;
        q.settle(&[], &[(k1, e1)]).unwrap();
        assert!(q.due(u64::MAX, 10).unwrap().is_empty());
        assert_eq!(q.next_due().unwrap(), None);
        assert_eq!(q.retry_failed().unwrap(), 1);
        assert_eq!(q.due(now_ms(), 10).unwrap().len(), 1);
    }
}
