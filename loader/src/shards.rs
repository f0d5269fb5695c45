//! Sharded checkpoints (`model.safetensors.index.json`) and single-file checkpoints
//! behind one lookup by tensor name.
//!
//! A Hugging Face checkpoint directory holds either
//! - `model.safetensors.index.json`, whose `weight_map` maps each tensor name to the
//!   shard file holding it (`model-00001-of-00002.safetensors`, ...), or
//! - a single `model.safetensors`, or
//! - exactly one `*.safetensors` file of another name.
//!
//! Every shard is mapped and validated once at open (see [`crate::safetensors`]); the
//! index is checked against the shards: every listed shard exists, every listed tensor
//! is in its shard, and no tensor name appears in two shards. Tensors that a shard holds
//! but the index does not list are still reachable. Lookup is a binary search over the
//! sorted names, O(log n).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::LoaderError;
use crate::safetensors::{HugePageRoute, SafeTensors, SafetensorsError, TensorInfo, TensorView};

/// File name of the shard index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// File name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

/// One or more safetensors files seen as one checkpoint.
#[derive(Debug)]
pub struct ShardedSafeTensors {
    dir: PathBuf,
    /// Shards sorted by file name (one entry for a single-file checkpoint).
    files: Vec<SafeTensors>,
    /// (tensor name, index into `files`), sorted by name, names unique.
    index: Vec<(String, usize)>,
}

impl ShardedSafeTensors {
    /// dir containing model.safetensors.index.json (weight_map: name -> shard file) or a
    /// single model.safetensors (or exactly one *.safetensors).
    pub fn open_dir(dir: &Path) -> Result<Self, LoaderError> {
        let index_path = dir.join(INDEX_FILE);
        if index_path.is_file() {
            return Self::open_index(dir, &index_path);
        }
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            return Self::from_files(dir, vec![SafeTensors::open(&single)?]);
        }
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| LoaderError::io(dir, e))? {
            let entry = entry.map_err(|e| LoaderError::io(dir, e))?;
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "safetensors") && path.is_file() {
                found.push(path);
            }
        }
        found.sort();
        match found.as_slice() {
            [] => Err(SafetensorsError::NoCheckpoint {
                dir: dir.display().to_string(),
            }
            .into()),
            [one] => Self::from_files(dir, vec![SafeTensors::open(one)?]),
            many => Err(SafetensorsError::AmbiguousCheckpoint {
                dir: dir.display().to_string(),
                files: many
                    .iter()
                    .map(|p| {
                        p.file_name()
                            .unwrap_or_default()
                            .to_string_lossy()
                            .into_owned()
                    })
                    .collect(),
            }
            .into()),
        }
    }

    fn open_index(dir: &Path, index_path: &Path) -> Result<Self, LoaderError> {
        let index_name = index_path.display().to_string();
        let bad = |reason: String| SafetensorsError::BadIndex {
            index: index_name.clone(),
            reason,
        };
        let text =
            std::fs::read_to_string(index_path).map_err(|e| LoaderError::io(index_path, e))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let map = json
            .get("weight_map")
            .ok_or_else(|| bad("no `weight_map`".into()))?
            .as_object()
            .ok_or_else(|| bad("`weight_map` is not an object".into()))?;

        // name -> shard file name, and the shard file names in sorted order.
        let mut wanted: BTreeMap<&str, &str> = BTreeMap::new();
        let mut shard_names: Vec<&str> = Vec::new();
        for (name, shard) in map {
            let shard = shard
                .as_str()
                .ok_or_else(|| bad(format!("`weight_map[\"{name}\"]` is not a string")))?;
            if !is_plain_file_name(shard) {
                return Err(bad(format!(
                    "shard `{shard}` of tensor `{name}` is not a plain file name in the checkpoint dir"
                ))
                .into());
            }
            wanted.insert(name, shard);
            shard_names.push(shard);
        }
        shard_names.sort_unstable();
        shard_names.dedup();

        let mut files = Vec::with_capacity(shard_names.len());
        for shard in &shard_names {
            let path = dir.join(shard);
            if !path.is_file() {
                return Err(SafetensorsError::MissingShard {
                    index: index_name.clone(),
                    shard: (*shard).to_string(),
                }
                .into());
            }
            files.push(SafeTensors::open(&path)?);
        }
        for (name, shard) in &wanted {
            // shard_names is sorted and holds every shard, so the search finds it.
            let k =
                shard_names
                    .binary_search(shard)
                    .map_err(|_| SafetensorsError::MissingShard {
                        index: index_name.clone(),
                        shard: (*shard).to_string(),
                    })?;
            if files[k].info(name).is_none() {
                return Err(SafetensorsError::TensorNotInShard {
                    index: index_name.clone(),
                    name: (*name).to_string(),
                    shard: (*shard).to_string(),
                }
                .into());
            }
        }
        Self::from_files(dir, files)
    }

    /// Build the name index over `files`; a name in two files is an error.
    fn from_files(dir: &Path, files: Vec<SafeTensors>) -> Result<Self, LoaderError> {
        let total = files.iter().map(SafeTensors::len).sum();
        let mut index: Vec<(String, usize)> = Vec::with_capacity(total);
        for (k, f) in files.iter().enumerate() {
            index.extend(f.names().map(|n| (n.to_string(), k)));
        }
        index.sort_unstable();
        for w in index.windows(2) {
            if w[0].0 == w[1].0 {
                return Err(SafetensorsError::DuplicateAcrossShards {
                    name: w[0].0.clone(),
                    first: files[w[0].1].path().display().to_string(),
                    second: files[w[1].1].path().display().to_string(),
                }
                .into());
            }
        }
        Ok(ShardedSafeTensors {
            dir: dir.to_path_buf(),
            files,
            index,
        })
    }

    fn find(&self, name: &str) -> Option<&SafeTensors> {
        let k = self
            .index
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()?;
        self.files.get(self.index[k].1)
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A zero-copy view of tensor `name` from whichever shard holds it; `MissingTensor`
    /// (naming the directory) if none does.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>, SafetensorsError> {
        match self.find(name) {
            Some(f) => f.tensor(name),
            None => Err(SafetensorsError::MissingTensor {
                file: self.dir.display().to_string(),
                name: name.to_string(),
            }),
        }
    }

    /// The header entry of tensor `name`.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.find(name)?.info(name)
    }

    /// The shard holding tensor `name`.
    pub fn file_of(&self, name: &str) -> Option<&SafeTensors> {
        self.find(name)
    }

    /// All tensor names over all shards, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.iter().map(|(n, _)| n.as_str())
    }

    /// Number of tensors over all shards.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True if no shard holds a tensor.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The shards, sorted by file name.
    pub fn files(&self) -> &[SafeTensors] {
        &self.files
    }

    /// [`SafeTensors::make_resident`] on every shard; returns the bytes copied. On an
    /// error the shards already copied stay copied (same bytes, same views).
    pub fn make_resident(&mut self) -> Result<usize, LoaderError> {
        let mut bytes = 0;
        for f in &mut self.files {
            bytes += f.make_resident()?;
        }
        Ok(bytes)
    }

    /// [`SafeTensors::use_huge_pages`] on every shard; returns the costliest route taken
    /// (a copy over a reread over the page cache as it was).
    pub fn use_huge_pages(&mut self) -> Result<HugePageRoute, LoaderError> {
        let mut route = HugePageRoute::PageCache;
        for f in &mut self.files {
            route = route.max(f.use_huge_pages()?);
        }
        Ok(route)
    }

    /// Bytes of all shards the kernel maps with 2 MiB pages now, and the bytes mapped
    /// in all; None where unknown ([`SafeTensors::huge_page_bytes`]).
    pub fn huge_page_bytes(&self) -> Option<(usize, usize)> {
        let mut huge = 0;
        let mut all = 0;
        for f in &self.files {
            huge += f.huge_page_bytes()?;
            all += f.mapped_bytes().len();
        }
        Some((huge, all))
    }
}

/// True for a name that stays inside the checkpoint directory: one normal component.
fn is_plain_file_name(s: &str) -> bool {
    let p = Path::new(s);
    let mut comps = p.components();
    matches!(
        (comps.next(), comps.next()),
        (Some(std::path::Component::Normal(_)), None)
    )
}

#[cfg(test)]
mod tests {
    use super::is_plain_file_name;

    #[test]
    fn plain_file_names() {
        assert!(is_plain_file_name("model-00001-of-00002.safetensors"));
        assert!(!is_plain_file_name("../x.safetensors"));
        assert!(!is_plain_file_name("/etc/x"));
        assert!(!is_plain_file_name("a/b"));
        assert!(!is_plain_file_name(""));
        assert!(!is_plain_file_name(".."));
    }
}
