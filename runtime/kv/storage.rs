//! CPU K/V arenas: one allocation each for K and V, laid out (L, num_blocks, block_size,
//! NKV * HS) f32, indexed by the [`BlockId`]s the manager hands out (mistral.rs
//! `CacheEngine` split: bookkeeping in `table.rs`, memory here).
//!
//! L layers, NKV key/value heads, HS head dim; a "row" is one position's NKV * HS values.

use super::KvError;
use super::block_pool::BlockId;

#[derive(Debug)]
pub struct KvStorage {
    n_layers: usize,
    num_blocks: usize,
    block_size: usize,
    /// NKV * HS
    kv_dim: usize,
    /// (L, num_blocks, block_size, NKV * HS) f32
    k: Vec<f32>,
    /// (L, num_blocks, block_size, NKV * HS) f32
    v: Vec<f32>,
}

impl KvStorage {
    /// Allocates both arenas once, zeroed. `kv_dim` = NKV * HS.
    pub fn new(
        n_layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_dim: usize,
    ) -> Result<Self, KvError> {
        const OP: &str = "KvStorage::new";
        for (arg, value) in [
            ("n_layers", n_layers),
            ("num_blocks", num_blocks),
            ("block_size", block_size),
            ("kv_dim", kv_dim),
        ] {
            if value == 0 {
                return Err(KvError::InvalidArgument {
                    op: OP,
                    arg,
                    reason: "must be at least 1".into(),
                });
            }
        }
        let total = n_layers
            .checked_mul(num_blocks)
            .and_then(|x| x.checked_mul(block_size))
            .and_then(|x| x.checked_mul(kv_dim))
            .filter(|&x| x.checked_mul(std::mem::size_of::<f32>()).is_some())
            .ok_or(KvError::InvalidArgument {
                op: OP,
                arg: "num_blocks",
                reason: format!(
                    "{n_layers} x {num_blocks} x {block_size} x {kv_dim} f32 overflows the address space"
                ),
            })?;
        Ok(Self {
            n_layers,
            num_blocks,
            block_size,
            kv_dim,
            k: vec![0.0; total],
            v: vec![0.0; total],
        })
    }

    pub fn n_layers(&self) -> usize {
        self.n_layers
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    fn block_len(&self) -> usize {
        self.block_size * self.kv_dim
    }

    /// Start of (layer, block) in an arena.
    fn block_start(
        &self,
        op: &'static str,
        layer: usize,
        block: BlockId,
    ) -> Result<usize, KvError> {
        if layer >= self.n_layers {
            return Err(KvError::InvalidArgument {
                op,
                arg: "layer",
                reason: format!("layer {layer} of {}", self.n_layers),
            });
        }
        if block.index() >= self.num_blocks {
            return Err(KvError::InvalidBlock {
                op,
                block,
                reason: "out of range for this storage",
            });
        }
        Ok((layer * self.num_blocks + block.index()) * self.block_len())
    }

    /// (block_size, NKV * HS) keys of one block in one layer.
    pub fn k_block(&self, layer: usize, block: BlockId) -> Result<&[f32], KvError> {
        let s = self.block_start("KvStorage::k_block", layer, block)?;
        Ok(&self.k[s..s + self.block_len()])
    }

    pub fn k_block_mut(&mut self, layer: usize, block: BlockId) -> Result<&mut [f32], KvError> {
        let s = self.block_start("KvStorage::k_block_mut", layer, block)?;
        let n = self.block_len();
        Ok(&mut self.k[s..s + n])
    }

    /// (block_size, NKV * HS) values of one block in one layer.
    pub fn v_block(&self, layer: usize, block: BlockId) -> Result<&[f32], KvError> {
        let s = self.block_start("KvStorage::v_block", layer, block)?;
        Ok(&self.v[s..s + self.block_len()])
    }

    pub fn v_block_mut(&mut self, layer: usize, block: BlockId) -> Result<&mut [f32], KvError> {
        let s = self.block_start("KvStorage::v_block_mut", layer, block)?;
        let n = self.block_len();
        Ok(&mut self.v[s..s + n])
    }

    /// Writes one position's (NKV * HS) key and value rows at `offset` of `block`.
    pub fn write(
        &mut self,
        layer: usize,
        block: BlockId,
        offset: usize,
        k_row: &[f32],
        v_row: &[f32],
    ) -> Result<(), KvError> {
        const OP: &str = "KvStorage::write";
        let s = self.block_start(OP, layer, block)?;
        if offset >= self.block_size {
            return Err(KvError::InvalidArgument {
                op: OP,
                arg: "offset",
                reason: format!("row {offset} of a {}-row block", self.block_size),
            });
        }
        for (arg, row) in [("k_row", k_row), ("v_row", v_row)] {
            if row.len() != self.kv_dim {
                return Err(KvError::InvalidArgument {
                    op: OP,
                    arg,
                    reason: format!("{} values, expected NKV * HS = {}", row.len(), self.kv_dim),
                });
            }
        }
        let at = s + offset * self.kv_dim;
        self.k[at..at + self.kv_dim].copy_from_slice(k_row);
        self.v[at..at + self.kv_dim].copy_from_slice(v_row);
        Ok(())
    }

    /// Copies rows `0..len` of `src` into `dst`, K and V, in every layer (copy-on-write).
    pub fn copy_block(&mut self, src: BlockId, dst: BlockId, len: usize) -> Result<(), KvError> {
        const OP: &str = "KvStorage::copy_block";
        if len > self.block_size {
            return Err(KvError::InvalidArgument {
                op: OP,
                arg: "len",
                reason: format!("{len} rows of a {}-row block", self.block_size),
            });
        }
        // Range checks for both ids before touching anything.
        self.block_start(OP, 0, src)?;
        self.block_start(OP, 0, dst)?;
        if src == dst {
            return Ok(());
        }
        let n = len * self.kv_dim;
        for layer in 0..self.n_layers {
            let s = self.block_start(OP, layer, src)?;
            let d = self.block_start(OP, layer, dst)?;
            self.k.copy_within(s..s + n, d);
            self.v.copy_within(s..s + n, d);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_lands_at_layer_block_offset() {
        let mut s = KvStorage::new(2, 3, 4, 2).unwrap();
        s.write(1, BlockId(2), 3, &[1.0, 2.0], &[3.0, 4.0]).unwrap();
        assert_eq!(&s.k_block(1, BlockId(2)).unwrap()[6..8], &[1.0, 2.0]);
        assert_eq!(&s.v_block(1, BlockId(2)).unwrap()[6..8], &[3.0, 4.0]);
        assert!(s.k_block(0, BlockId(2)).unwrap().iter().all(|&x| x == 0.0));
        assert_eq!(s.k.iter().filter(|&&x| x != 0.0).count(), 2);
        let last = s.k.len() - 2;
        assert_eq!(&s.k[last..], &[1.0, 2.0]);
    }

    #[test]
    fn bad_arguments_are_named() {
        let mut s = KvStorage::new(1, 2, 4, 2).unwrap();
        assert!(matches!(
            s.write(0, BlockId(0), 4, &[0.0; 2], &[0.0; 2]),
            Err(KvError::InvalidArgument { arg: "offset", .. })
        ));
        assert!(matches!(
            s.write(0, BlockId(0), 0, &[0.0; 3], &[0.0; 2]),
            Err(KvError::InvalidArgument { arg: "k_row", .. })
        ));
        assert!(matches!(
            s.write(1, BlockId(0), 0, &[0.0; 2], &[0.0; 2]),
            Err(KvError::InvalidArgument { arg: "layer", .. })
        ));
        assert!(matches!(
            s.k_block_mut(0, BlockId(2)),
            Err(KvError::InvalidBlock {
                block: BlockId(2),
                ..
            })
        ));
        assert!(matches!(
            s.copy_block(BlockId(0), BlockId(1), 5),
            Err(KvError::InvalidArgument { arg: "len", .. })
        ));
        assert!(matches!(
            KvStorage::new(1, 0, 4, 2),
            Err(KvError::InvalidArgument {
                arg: "num_blocks",
                ..
            })
        ));
    }
}
