//! The export side of a pull: reading maps and bytes from an NBD connection.
//!
//! [`Reader`] and [`Mapper`] are the two things a pull needs of a connection; the
//! transfer and the map gathering are written against them so they can be tested against
//! in-memory models, and [`Connection`] implements them over the `tidemark_nbd` client.

use std::future::Future;

use anyhow::Context;

use super::plan::{ExtentMap, Run};

/// Largest range asked for in one BLOCK_STATUS request. Servers answer for less when they
/// like (qemu stops at its own limits); 1 GiB keeps each reply small and the 32-bit
/// length of compact requests safe.
pub const MAX_STATUS_REQUEST: u64 = 1 << 30;

/// One connection to the export, able to carry several reads at once.
pub trait Reader: Send + Sync + 'static {
    /// Fill `buf` with the export's bytes at `offset`.
    fn read<'a>(
        &'a self,
        offset: u64,
        buf: &'a mut [u8],
    ) -> impl Future<Output = anyhow::Result<()>> + Send + 'a;
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

// TEMP-SHIM: replaced by the tidemark_nbd client adapter when it lands.
#[derive(Debug)]
pub struct Connection;
impl Connection {
    pub async fn open(_uri: &str, _contexts: &[String]) -> anyhow::Result<Connection> {
        anyhow::bail!("shim")
    }
    pub fn size(&self) -> u64 {
        0
    }
    pub fn can_multi_conn(&self) -> bool {
        false
    }
    pub fn has_context(&self, _c: &str) -> bool {
        false
    }
    pub async fn offered_bitmaps(&self, _uri: &str) -> Vec<String> {
        Vec::new()
    }
    pub async fn close(self) {}
}
impl Reader for Connection {
    async fn read(&self, _offset: u64, _buf: &mut [u8]) -> anyhow::Result<()> {
        anyhow::bail!("shim")
    }
}
impl Mapper for Connection {
    async fn block_status(&self, _c: &str, _o: u64, _l: u64) -> anyhow::Result<Vec<(u64, u32)>> {
        anyhow::bail!("shim")
    }
}
