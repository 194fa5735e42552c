//! The agent's upstream outbox: notifications (alerts now, remediation reports next) are
//! written here before any attempt to deliver them, and leave only once their receiver took
//! them, so none is lost while an upstream is down or the agent restarts.
//!
//! Storage is an embedded ACID store (redb): a push returns once its record is durable (the
//! commit is fsync'd). Each receiver drains its own records in the order they were pushed.
//! The outbox is bounded in records and bytes; past either bound the oldest record (of any
//! receiver) goes first, and is counted, never silently.

use std::{
    path::Path,
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use redb::{
    Database, ReadableDatabase as _, ReadableTable as _, ReadableTableMetadata as _,
    TableDefinition,
};

/// Records by (receiver, sequence number): one receiver's records in push order.
const RECORDS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("records");
/// Receivers by sequence number: every record in push order, for dropping the oldest.
const ORDER: TableDefinition<u64, &str> = TableDefinition::new("order");
/// Counters that outlive the process: `next_seq`, `dropped`, `bytes`.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// redb's page cache for the outbox.
pub const OUTBOX_CACHE_BYTES: usize = 4 << 20;

/// Bytes of a record's header before its body: when it was pushed (ms since the epoch).
const HEADER: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("opening the outbox at {path}")]
    Open {
        path: String,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("outbox storage")]
    Storage(#[from] redb::Error),
    #[error("a record of {0} bytes is larger than the outbox ({1} bytes)")]
    TooLarge(usize, u64),
    #[error("receiver names are 1 to 256 bytes")]
    BadReceiver,
}

macro_rules! storage {
    ($($t:ty),*) => {$(
        impl From<$t> for OutboxError {
            fn from(e: $t) -> Self {
                Self::Storage(e.into())
            }
        }
    )*};
}
storage!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// How much the outbox may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    pub records: u64,
    pub bytes: u64,
}

/// A record as a receiver reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub pushed_at: SystemTime,
    pub body: Vec<u8>,
}

/// What the outbox holds and has lost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub records: u64,
    pub bytes: u64,
    /// Records dropped, oldest first, to stay within the bound (since the outbox was made).
    pub dropped: u64,
    /// Age of the oldest record held.
    pub oldest_age: Option<Duration>,
}

pub struct Outbox {
    db: Database,
    bound: Bound,
    /// One writer at a time: a push and the drops it causes are one transaction.
    write: Mutex<()>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("bound", &self.bound)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Outbox {
    /// Opens (or creates) the outbox file at `path`.
    pub fn open(path: &Path, bound: Bound) -> Result<Self, OutboxError> {
        // redb's page cache defaults to a share of the machine's memory; the outbox is read
        // once per record, so a small cache is all it needs (see `budget::OUTBOX_BYTES`).
        let db = Database::builder()
            .set_cache_size(OUTBOX_CACHE_BYTES)
            .create(path)
            .map_err(|source| OutboxError::Open {
                path: path.display().to_string(),
                source,
            })?;
        let tx = db.begin_write()?;
        {
            tx.open_table(RECORDS)?;
            tx.open_table(ORDER)?;
            tx.open_table(META)?;
        }
        tx.commit()?;
        Ok(Self {
            db,
            bound,
            write: Mutex::new(()),
        })
    }

    /// Stores `body` for `receiver`; durable when this returns. Returns its sequence number.
    /// Drops the oldest records (of any receiver) if the bound would be passed.
    pub fn push(&self, receiver: &str, body: &[u8]) -> Result<u64, OutboxError> {
        if receiver.is_empty() || receiver.len() > 256 {
            return Err(OutboxError::BadReceiver);
        }
        let size = (HEADER + body.len()) as u64;
        if size > self.bound.bytes {
            return Err(OutboxError::TooLarge(body.len(), self.bound.bytes));
        }
        let _one = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let tx = self.db.begin_write()?;
        let seq;
        {
            let mut meta = tx.open_table(META)?;
            let mut records = tx.open_table(RECORDS)?;
            let mut order = tx.open_table(ORDER)?;
            let get = |m: &redb::Table<&str, u64>, k: &str| -> Result<u64, OutboxError> {
                Ok(m.get(k)?.map_or(0, |v| v.value()))
            };
            seq = get(&meta, "next_seq")?;
            let mut bytes = get(&meta, "bytes")?;
            let mut dropped = get(&meta, "dropped")?;
            let mut held = order.len()?;
            // Room first: the oldest records go until this one fits.
            while held + 1 > self.bound.records || bytes + size > self.bound.bytes {
                let Some((s, r)) = order
                    .first()?
                    .map(|(s, r)| (s.value(), r.value().to_string()))
                else {
                    break;
                };
                order.remove(s)?;
                if let Some(old) = records.remove((r.as_str(), s))? {
                    bytes = bytes.saturating_sub(old.value().len() as u64);
                }
                dropped += 1;
                held -= 1;
            }
            let mut value = Vec::with_capacity(HEADER + body.len());
            value.extend_from_slice(&now_ms().to_le_bytes());
            value.extend_from_slice(body);
            records.insert((receiver, seq), value.as_slice())?;
            order.insert(seq, receiver)?;
            meta.insert("next_seq", seq + 1)?;
            meta.insert("bytes", bytes + size)?;
            meta.insert("dropped", dropped)?;
        }
        tx.commit()?;
        Ok(seq)
    }

    /// The oldest `n` records of `receiver`, in push order.
    pub fn peek(&self, receiver: &str, n: usize) -> Result<Vec<Record>, OutboxError> {
        let tx = self.db.begin_read()?;
        let records = tx.open_table(RECORDS)?;
        let mut out = Vec::new();
        for item in records.range((receiver, 0)..=(receiver, u64::MAX))?.take(n) {
            let (k, v) = item?;
            let v = v.value();
            if v.len() < HEADER {
                continue;
            }
            let mut ms = [0u8; HEADER];
            ms.copy_from_slice(&v[..HEADER]);
            out.push(Record {
                seq: k.value().1,
                pushed_at: UNIX_EPOCH + Duration::from_millis(u64::from_le_bytes(ms)),
                body: v[HEADER..].to_vec(),
            });
        }
        Ok(out)
    }

    /// Removes `receiver`'s records up to and including `seq`: it has taken them.
    pub fn ack(&self, receiver: &str, seq: u64) -> Result<(), OutboxError> {
        let _one = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let tx = self.db.begin_write()?;
        {
            let mut meta = tx.open_table(META)?;
            let mut records = tx.open_table(RECORDS)?;
            let mut order = tx.open_table(ORDER)?;
            let mut bytes = meta.get("bytes")?.map_or(0, |v| v.value());
            let taken: Vec<(u64, u64)> = records
                .range((receiver, 0)..=(receiver, seq))?
                .map(|item| item.map(|(k, v)| (k.value().1, v.value().len() as u64)))
                .collect::<Result<_, _>>()?;
            for (s, len) in taken {
                records.remove((receiver, s))?;
                order.remove(s)?;
                bytes = bytes.saturating_sub(len);
            }
            meta.insert("bytes", bytes)?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn stats(&self) -> Result<Stats, OutboxError> {
        let tx = self.db.begin_read()?;
        let meta = tx.open_table(META)?;
        let order = tx.open_table(ORDER)?;
        let records = tx.open_table(RECORDS)?;
        let get =
            |k: &str| -> Result<u64, OutboxError> { Ok(meta.get(k)?.map_or(0, |v| v.value())) };
        let oldest_age = match order.first()? {
            Some((s, r)) => records.get((r.value(), s.value()))?.and_then(|v| {
                let v = v.value();
                let mut ms = [0u8; HEADER];
                ms.copy_from_slice(v.get(..HEADER)?);
                let at = UNIX_EPOCH + Duration::from_millis(u64::from_le_bytes(ms));
                Some(SystemTime::now().duration_since(at).unwrap_or_default())
            }),
            None => None,
        };
        Ok(Stats {
            records: order.len()?,
            bytes: get("bytes")?,
            dropped: get("dropped")?,
            oldest_age,
        })
    }
}

#[cfg(test)]
mod tests;
