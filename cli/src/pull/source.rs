//! The export side of a pull: reading maps and bytes from an NBD connection.
//!
//! [`Reader`] and [`Mapper`] are the two things a pull needs of a connection; the
//! transfer and the map gathering are written against them so they can be tested against
//! in-memory models, and [`Connection`] implements them over the `tidemark_nbd` client.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use tidemark_nbd::client::{Client, ClientOptions};
use tidemark_nbd::uri::NbdUri;

use super::plan::{ExtentMap, Run};

/// Largest range asked for in one BLOCK_STATUS request. Servers answer for less when they
/// like (qemu stops at its own limits); 1 GiB keeps each reply small and the 32-bit
/// length of compact requests safe.
pub const MAX_STATUS_REQUEST: u64 = 1 << 30;

/// One connection to the export, able to carry several reads at once.
pub trait Reader: Send + Sync + 'static {
    /// Fill `buf` (all of it) with the export's bytes at `offset` and hand it back, so
    /// buffers are recycled rather than allocated per request.
    fn read_into(
        &self,
        offset: u64,
        buf: Vec<u8>,
    ) -> impl Future<Output = anyhow::Result<Vec<u8>>> + Send + '_;
}

/// One connection that answers BLOCK_STATUS for the contexts negotiated on it.
pub trait Mapper {
    /// The extents (length, flags) describing the range from `offset`, in order. They may
    /// cover less than `length` but never nothing, or run past it.
    fn block_status<'a>(
        &'a self,
        context: &'a str,
        offset: u64,
        length: u64,
    ) -> impl Future<Output = anyhow::Result<Vec<(u64, u32)>>> + 'a;
}

/// The whole map of `context` over an export of `size` bytes, asking as often as the
/// server's partial answers need. `on_progress` gets the bytes described so far.
pub async fn gather<M: Mapper>(
    mapper: &M,
    context: &str,
    size: u64,
    mut on_progress: impl FnMut(u64),
) -> anyhow::Result<Vec<Run>> {
    let mut map = ExtentMap::new(context, size);
    while !map.is_complete() {
        let offset = map.covered();
        let length = (size - offset).min(MAX_STATUS_REQUEST);
        let extents = mapper
            .block_status(context, offset, length)
            .await
            .with_context(|| format!("asking for the {context} map at offset {offset}"))?;
        if extents.is_empty() {
            anyhow::bail!(
                "the server answered BLOCK_STATUS for {context} at offset {offset} with no \
                 extents; it is not following the NBD protocol"
            );
        }
        for (length, flags) in extents {
            map.push(length, flags)?;
        }
        on_progress(map.covered());
    }
    Ok(map.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// Answers with at most `step` bytes per reply, each reply in two extents, the last
    /// one running past the requested range.
    struct Choppy {
        step: u64,
        calls: Cell<u32>,
        empty_at: Option<u64>,
    }

    impl Mapper for Choppy {
        async fn block_status(
            &self,
            _context: &str,
            offset: u64,
            length: u64,
        ) -> anyhow::Result<Vec<(u64, u32)>> {
            self.calls.set(self.calls.get() + 1);
            if self.empty_at == Some(offset) {
                return Ok(Vec::new());
            }
            let half = self.step.min(length).div_ceil(2);
            let flags = ((offset / self.step) % 2) as u32;
            Ok(vec![(half, flags), (half + 7, flags ^ 1)])
        }
    }

    fn block_on<F: Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(future)
    }

    #[test]
    fn gather_stitches_partial_answers_into_one_map() {
        let mapper = Choppy {
            step: 100,
            calls: Cell::new(0),
            empty_at: None,
        };
        let mut seen = Vec::new();
        let runs = block_on(gather(&mapper, "base:allocation", 1000, |c| seen.push(c))).unwrap();
        assert_eq!(runs.first().map(|r| r.offset), Some(0));
        assert_eq!(runs.iter().map(|r| r.length).sum::<u64>(), 1000);
        assert!(runs
            .windows(2)
            .all(|w| w[0].offset + w[0].length == w[1].offset));
        assert!(mapper.calls.get() > 1);
        assert_eq!(seen.last(), Some(&1000));
    }

    #[test]
    fn gather_refuses_an_empty_answer() {
        let mapper = Choppy {
            step: 100,
            calls: Cell::new(0),
            empty_at: Some(107),
        };
        let err = block_on(gather(&mapper, "qemu:dirty-bitmap:b0", 1000, |_| {})).unwrap_err();
        assert!(format!("{err:#}").contains("no extents"), "{err:#}");
    }
}

/// A connected NBD client: one or several connections to one export, with the metadata
/// contexts negotiated on the first.
#[derive(Debug, Clone)]
pub struct Connection {
    client: Client,
    uri: String,
}

impl Connection {
    /// Connect to `uri` selecting `contexts`, with up to `connections` connections (more
    /// than one only when the server advertises CAN_MULTI_CONN) of `depth` requests in
    /// flight each, giving up after `timeout`.
    pub async fn open(
        uri: &str,
        contexts: &[String],
        connections: usize,
        depth: usize,
        timeout: Duration,
    ) -> anyhow::Result<Connection> {
        let parsed: NbdUri = uri.parse()?;
        let options = ClientOptions {
            meta_contexts: contexts.to_vec(),
            connections: connections.max(1),
            depth: depth.max(1),
            connect_timeout: timeout,
            ..ClientOptions::default()
        };
        // The client's errors name the URI already.
        let client = Client::connect(&parsed, options).await?;
        Ok(Connection {
            client,
            uri: uri.to_string(),
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.client.size()
    }

    /// The export's NBD description (empty when the server sent none).
    pub fn description(&self) -> &str {
        &self.client.info().description
    }

    /// Whether the server allows several connections to the export.
    pub fn can_multi_conn(&self) -> bool {
        self.client.can_multi_conn()
    }

    /// Connections this client holds.
    pub fn connections(&self) -> usize {
        self.client.connections()
    }

    /// The largest read the server accepts.
    pub fn max_request(&self) -> u64 {
        self.client.max_request()
    }

    /// Whether the server selected `context` during negotiation.
    pub fn has_context(&self, context: &str) -> bool {
        self.client
            .info()
            .contexts
            .iter()
            .any(|(_, name)| name == context)
    }

    /// Say goodbye on every connection (NBD_CMD_DISC).
    pub async fn close(&self) {
        self.client.disconnect().await;
    }
}

impl Reader for Connection {
    async fn read_into(&self, offset: u64, buf: Vec<u8>) -> anyhow::Result<Vec<u8>> {
        Ok(self.client.read_into(offset, buf).await?)
    }
}

impl Mapper for Connection {
    async fn block_status(
        &self,
        context: &str,
        offset: u64,
        length: u64,
    ) -> anyhow::Result<Vec<(u64, u32)>> {
        let extents = self
            .client
            .block_status(context, offset, length)
            .await
            .with_context(|| format!("BLOCK_STATUS on {}", self.uri))?;
        Ok(extents.into_iter().map(|e| (e.length, e.flags)).collect())
    }
}
