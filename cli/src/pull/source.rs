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

/// One BLOCK_STATUS reply: per context (by name), its extents `(length, flags)`.
pub type ContextExtents = Vec<(String, Vec<(u64, u32)>)>;

/// One connection that answers BLOCK_STATUS for the contexts negotiated on it.
pub trait Mapper {
    /// One BLOCK_STATUS request from `offset` for up to `length` bytes: per context (by
    /// name) the extents (length, flags) the server sent, in order from `offset`. A
    /// context's extents may cover less than `length` (and differ in reach between
    /// contexts) or run past it.
    fn block_status(
        &self,
        offset: u64,
        length: u64,
    ) -> impl Future<Output = anyhow::Result<ContextExtents>> + '_;
}

/// The whole maps of `contexts` over an export of `size` bytes, in the order given.
///
/// A reply answers for every context the connection negotiated, so the maps are gathered
/// together: each request asks from where the shortest unfinished map stops to the end of
/// the export (the client cuts it to what one request may carry: all of it with extended
/// headers, 4 GiB with compact ones), and each map keeps what is new to it. A 15 TiB export
/// then costs a few requests instead of one per GiB and context.
pub async fn gather<M: Mapper>(
    mapper: &M,
    contexts: &[&str],
    size: u64,
) -> anyhow::Result<Vec<Vec<Run>>> {
    let mut maps: Vec<ExtentMap> = contexts.iter().map(|c| ExtentMap::new(*c, size)).collect();
    while let Some(offset) = maps
        .iter()
        .filter(|m| !m.is_complete())
        .map(ExtentMap::covered)
        .min()
    {
        let replies = mapper
            .block_status(offset, size - offset)
            .await
            .with_context(|| {
                format!(
                    "asking for the {} maps at offset {offset}",
                    contexts.join(" and ")
                )
            })?;
        for map in maps.iter_mut().filter(|m| !m.is_complete()) {
            let context = map.context();
            let extents = match replies.iter().find(|(name, _)| name == context) {
                Some((_, extents)) if !extents.is_empty() => extents,
                _ => anyhow::bail!(
                    "the server answered BLOCK_STATUS at offset {offset} with no extents for \
                     {context}; it is not following the NBD protocol"
                ),
            };
            map.push_from(offset, extents)?;
        }
    }
    maps.into_iter().map(|map| Ok(map.finish()?)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// Fixed maps of two contexts (runs of alternating flags from offset 0), answered from
    /// any offset with at most `per_reply` extents per context, the first one cut at the
    /// offset and the last one running past the asked range where the map's run does.
    struct Maps {
        maps: [(&'static str, &'static [u64]); 2],
        per_reply: [usize; 2],
        calls: Cell<u32>,
        empty_at: Option<u64>,
    }

    impl Maps {
        fn new(per_reply: [usize; 2], empty_at: Option<u64>) -> Maps {
            Maps {
                maps: [
                    ("base:allocation", &[30, 70, 10, 200, 5, 685]),
                    ("qemu:dirty-bitmap:b0", &[300, 1, 99, 600]),
                ],
                per_reply,
                calls: Cell::new(0),
                empty_at,
            }
        }

        /// The map of `context` as runs.
        fn runs(&self, context: &str) -> Vec<Run> {
            let (_, lengths) = self.maps.iter().find(|(name, _)| *name == context).unwrap();
            let mut offset = 0;
            lengths
                .iter()
                .enumerate()
                .map(|(i, &length)| {
                    let run = Run {
                        offset,
                        length,
                        flags: (i % 2) as u32,
                    };
                    offset += length;
                    run
                })
                .collect()
        }
    }

    impl Mapper for Maps {
        async fn block_status(&self, offset: u64, length: u64) -> anyhow::Result<ContextExtents> {
            self.calls.set(self.calls.get() + 1);
            Ok(self
                .maps
                .iter()
                .zip(self.per_reply)
                .map(|(&(name, _), per_reply)| {
                    let extents = if self.empty_at == Some(offset) {
                        Vec::new()
                    } else {
                        self.runs(name)
                            .into_iter()
                            .filter(|r| r.offset + r.length > offset && r.offset < offset + length)
                            .take(per_reply)
                            .map(|r| (r.offset + r.length - offset.max(r.offset), r.flags))
                            .collect()
                    };
                    (name.to_string(), extents)
                })
                .collect())
        }
    }

    fn block_on<F: Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(future)
    }

    #[test]
    fn gather_stitches_partial_answers_of_two_contexts_into_two_maps() {
        for per_reply in [[1, 1], [1, 3], [2, 1], [100, 100]] {
            let mapper = Maps::new(per_reply, None);
            let contexts = ["qemu:dirty-bitmap:b0", "base:allocation"];
            let maps = block_on(gather(&mapper, &contexts, 1000)).unwrap();
            for (runs, context) in maps.iter().zip(contexts) {
                assert_eq!(runs, &mapper.runs(context), "{context}, {per_reply:?}");
            }
            // One request answers both: no more requests than the two walks alone.
            let walks: Vec<usize> = per_reply
                .iter()
                .zip([6, 4])
                .map(|(n, runs)| (runs as usize).div_ceil(*n))
                .collect();
            let calls = mapper.calls.get() as usize;
            assert!(calls >= walks[0].max(walks[1]), "{calls} {per_reply:?}");
            assert!(calls <= walks[0] + walks[1], "{calls} {per_reply:?}");
        }
        // A map cut short of the export is refused.
        let mapper = Maps::new([100, 100], None);
        let err = block_on(gather(&mapper, &["base:allocation"], 1001)).unwrap_err();
        assert!(format!("{err:#}").contains("no extents"), "{err:#}");
    }

    #[test]
    fn gather_refuses_an_empty_answer() {
        let mapper = Maps::new([2, 2], Some(100));
        let err = block_on(gather(&mapper, &["base:allocation"], 1000)).unwrap_err();
        assert!(format!("{err:#}").contains("no extents"), "{err:#}");
    }

    #[test]
    fn gather_refuses_a_reply_without_a_context() {
        let mapper = Maps::new([2, 2], None);
        let err = block_on(gather(&mapper, &["qemu:dirty-bitmap:zz"], 1000)).unwrap_err();
        assert!(
            format!("{err:#}").contains("no extents for qemu:dirty-bitmap:zz"),
            "{err:#}"
        );
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
    async fn block_status(&self, offset: u64, length: u64) -> anyhow::Result<ContextExtents> {
        let replies = self
            .client
            .block_status_contexts(offset, length)
            .await
            .with_context(|| format!("BLOCK_STATUS on {}", self.uri))?;
        Ok(replies
            .into_iter()
            .map(|(name, extents)| {
                (
                    name,
                    extents.into_iter().map(|e| (e.length, e.flags)).collect(),
                )
            })
            .collect())
    }
}
