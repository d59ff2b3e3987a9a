//! `tidemark pull --repo URL`: the pulled ranges become a point in a repository, through
//! [`PointBuilder`] (an incremental pull reuses every chunk its bitmap left clean and never
//! asks the export for a clean byte).

use tidemark_repo::builder::PointBuilder;
use tidemark_repo::format::valid_name;
use tidemark_repo::{Repository, StoreOptions};

pub use tidemark_repo::builder::PointNames;

use super::sink::Sink;

/// What `--repo` needs besides the export.
#[derive(Debug, Clone, Default)]
pub struct RepoTarget {
    pub url: String,
    pub store: StoreOptions,
    /// `--volume` (default: the tidemark export's volume name).
    pub volume: Option<String>,
    pub break_lock: bool,
    /// Pack worker threads.
    pub workers: usize,
}

/// The volume name a tidemark export's description names (`... of volume NAME (volume uuid`).
pub fn described_volume(description: &str) -> Option<String> {
    if !description.starts_with("tidemark ") {
        return None;
    }
    let start = description.find(" of volume ")? + " of volume ".len();
    let end = description.rfind(" (volume uuid ")?;
    let name = description.get(start..end)?;
    valid_name(name).then(|| name.to_string())
}

/// A sink that stores a point.
#[derive(Debug)]
pub struct RepoSink {
    builder: PointBuilder,
}

impl RepoSink {
    /// Open the repository, take its lock, load its chunk index and (incremental) the base.
    pub async fn open(
        target: &RepoTarget,
        names: &PointNames,
        size: u64,
    ) -> anyhow::Result<RepoSink> {
        let repo = Repository::open(&target.url, &target.store).await?;
        let builder =
            PointBuilder::open(&repo, names, size, target.break_lock, target.workers).await?;
        Ok(RepoSink { builder })
    }
}

impl Sink for RepoSink {
    fn write(&mut self, offset: u64, data: &[u8]) -> anyhow::Result<()> {
        Ok(self.builder.write(offset, data)?)
    }

    fn zero(&mut self, offset: u64, length: u64) -> anyhow::Result<()> {
        Ok(self.builder.zero(offset, length)?)
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        self.builder.finish()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn the_volume_name_comes_from_a_tidemark_description() {
        let text = tidemark_daemon::export::describe_origin(
            "tidemark snapshot backup-3 of volume vm1",
            Uuid::new_v4(),
            65536,
        );
        assert_eq!(described_volume(&text).as_deref(), Some("vm1"));
        assert_eq!(described_volume("qemu disk"), None);
        assert_eq!(
            described_volume("tidemark snapshot of volume a/b (volume uuid x)"),
            None
        );
    }
}
