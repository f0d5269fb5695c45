//! Paged KV cache bookkeeping: block boundaries, fork K with shared blocks, copy-on-write
//! of the partial last block, prefix reuse across requests (chosen/rejected), adapter
//! isolation, LRU eviction, all-or-nothing capacity errors, the CPU storage copy, and a
//! seeded random walk that checks every invariant (and the stored K/V content) per step.

use cloudrm::kv::{BlockId, CopyBlock, KvError, KvManager, KvStorage, PrefixKey, SeqId, Slot};

const BASE: PrefixKey = PrefixKey::BASE;

/// SplitMix64: a tiny seeded RNG so the test needs no extra crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn toks(start: u32, n: usize) -> Vec<u32> {
    (start..start + n as u32).collect()
}

fn refs(m: &KvManager, blocks: &[BlockId]) -> Vec<u32> {
    blocks
        .iter()
        .map(|&b| m.pool().ref_count(b).unwrap())
        .collect()
}

/// Everything observable about the manager, for "nothing changed" checks.
fn snapshot(m: &KvManager) -> String {
    let mut s = format!(
        "free={} evictable={:?} free_list={:?} cached={}\n",
        m.free_blocks(),
        m.pool().evictable_order(),
        m.pool().free_list(),
        m.pool().prefix_cache().len()
    );
    for b in 0..m.pool().num_blocks() as u32 {
        let b = BlockId(b);
        s += &format!(
            "{b}: ref={:?} gen={:?} hash={:?}\n",
            m.pool().ref_count(b),
            m.pool().generation(b),
            m.pool().cached_hash(b)
        );
    }
    for seq in m.sequences() {
        let t = m.table(seq).unwrap();
        s += &format!(
            "{seq}: len={} blocks={:?} committed={}\n",
            t.len(),
            t.blocks(),
            t.num_committed()
        );
    }
    s
}

/// The invariants that must hold after every operation.
fn check_invariants(m: &KvManager) {
    let pool = m.pool();
    let n = pool.num_blocks();
    let bs = m.block_size();
    let mut occurrences = vec![0u32; n];
    for seq in m.sequences() {
        let t = m.table(seq).unwrap();
        assert_eq!(
            t.blocks().len(),
            t.len().div_ceil(bs),
            "{seq}: block count vs ceil(len / block_size)"
        );
        for b in t.blocks() {
            occurrences[b.index()] += 1;
        }
    }
    let mut used = 0;
    let mut cached = 0;
    for (i, &occ) in occurrences.iter().enumerate() {
        let b = BlockId(i as u32);
        assert_eq!(pool.ref_count(b).unwrap(), occ, "{b}: ref count vs tables");
        used += usize::from(occ > 0);
        cached += usize::from(pool.cached_hash(b).is_some());
    }
    assert_eq!(pool.free_blocks() + used, n, "free + used == total");
    assert_eq!(pool.num_used(), used);
    assert_eq!(
        pool.prefix_cache().len(),
        cached,
        "one cache entry per hashed block"
    );
    let free = pool.free_list();
    assert_eq!(free.len(), pool.free_blocks());
    let mut seen = vec![false; n];
    for b in &free {
        assert!(!seen[b.index()], "{b} twice on the free lists");
        seen[b.index()] = true;
        assert_eq!(pool.ref_count(*b).unwrap(), 0, "{b} free and referenced");
    }
    let evictable = pool.evictable_order();
    assert_eq!(evictable.len(), pool.num_evictable());
    for b in &evictable {
        assert!(
            pool.cached_hash(*b).is_some(),
            "{b} evictable but not cached"
        );
    }
    for b in &free[..free.len() - evictable.len()] {
        assert!(pool.cached_hash(*b).is_none(), "{b} plain free but cached");
    }
}

#[test]
fn boundary_lengths_take_ceil_blocks() {
    for bs in [4usize, 16] {
        for len in [bs - 1, bs, bs + 1] {
            let mut m = KvManager::new(8, bs).unwrap();
            let (seq, cached) = m.add_sequence(&toks(0, len), BASE).unwrap();
            assert_eq!(cached, 0);
            assert_eq!(m.seq_len(seq).unwrap(), len);
            assert_eq!(m.block_table(seq).unwrap().len(), len.div_ceil(bs));
            assert_eq!(m.free_blocks(), 8 - len.div_ceil(bs));
            // Grow one token at a time across the next boundary.
            for step in 1..=bs + 1 {
                let slots = m.append_slots(seq, 1).unwrap();
                assert!(slots.pending_copy().is_none());
                let slots = slots.apply(|_| Ok::<_, KvError>(())).unwrap();
                let pos = len + step - 1;
                let table = m.block_table(seq).unwrap();
                assert_eq!(
                    slots,
                    vec![Slot {
                        block: table[pos / bs],
                        offset: pos % bs
                    }]
                );
                assert_eq!(table.len(), (pos + 1).div_ceil(bs), "bs={bs} len={len}");
                check_invariants(&m);
            }
            // A batch append returns consecutive slots.
            let before = m.seq_len(seq).unwrap();
            let slots = m
                .append_slots(seq, bs + 1)
                .unwrap()
                .apply(|_| Ok::<_, KvError>(()))
                .unwrap();
            assert_eq!(slots.len(), bs + 1);
            for (i, s) in slots.iter().enumerate() {
                assert_eq!(*s, m.slot(seq, before + i).unwrap());
            }
            assert!(m.append_slots(seq, 0).unwrap().peek_slots().is_empty());
            check_invariants(&m);
        }
    }
}

#[test]
fn fork_shares_all_blocks_without_allocating() {
    for bs in [4usize, 16] {
        for len in [bs - 1, bs, bs + 1, 3 * bs + 2] {
            for k in [1usize, 3, 16] {
                let mut m = KvManager::new(64, bs).unwrap();
                let (parent, _) = m.add_sequence(&toks(7, len), BASE).unwrap();
                let free = m.free_blocks();
                let blocks = m.block_table(parent).unwrap().to_vec();
                let children = m.fork(parent, k).unwrap();
                assert_eq!(children.len(), k);
                assert_eq!(m.free_blocks(), free, "fork must not allocate");
                assert!(refs(&m, &blocks).iter().all(|&r| r as usize == k + 1));
                for &c in &children {
                    assert_ne!(c, parent);
                    assert_eq!(m.block_table(c).unwrap(), &blocks[..]);
                    assert_eq!(m.seq_len(c).unwrap(), len);
                }
                check_invariants(&m);
                // Freeing the parent keeps the children's blocks alive.
                m.free_sequence(parent).unwrap();
                assert!(refs(&m, &blocks).iter().all(|&r| r as usize == k));
                assert_eq!(m.free_blocks(), free);
                for c in children {
                    m.free_sequence(c).unwrap();
                }
                assert_eq!(m.free_blocks(), 64);
                check_invariants(&m);
            }
        }
    }
    let mut m = KvManager::new(4, 4).unwrap();
    let (s, _) = m.add_sequence(&[1, 2], BASE).unwrap();
    assert!(m.fork(s, 0).unwrap().is_empty());
    assert_eq!(
        m.fork(SeqId(77), 2),
        Err(KvError::UnknownSequence { seq: SeqId(77) })
    );
}

#[test]
fn copy_on_write_on_first_append_into_shared_partial_block() {
    for bs in [4usize, 16] {
        let len = bs + 1; // last block holds one row
        let mut m = KvManager::new(16, bs).unwrap();
        let mut store = KvStorage::new(3, 16, bs, 2).unwrap();
        let (parent, _) = m.add_sequence(&toks(0, len), BASE).unwrap();
        for p in 0..len {
            let s = m.slot(parent, p).unwrap();
            for layer in 0..3 {
                let x = (100 * layer + p) as f32;
                store
                    .write(layer, s.block, s.offset, &[x, -x], &[x + 0.5, -x])
                    .unwrap();
            }
        }
        let blocks = m.block_table(parent).unwrap().to_vec();
        let shared_last = blocks[1];
        let children = m.fork(parent, 3).unwrap();
        let free = m.free_blocks();

        let out = m.append_slots(children[0], 1).unwrap();
        let copy = *out
            .pending_copy()
            .expect("shared partial block must be copied");
        let c0 = m.block_table(children[0]).unwrap().to_vec();
        assert_eq!(
            copy,
            CopyBlock {
                src: shared_last,
                dst: c0[1],
                len: 1
            }
        );
        assert_ne!(c0[1], shared_last);
        assert_eq!(c0[0], blocks[0], "full blocks stay shared");
        assert_eq!(m.free_blocks(), free - 1, "exactly one fresh block");
        assert_eq!(m.pool().ref_count(shared_last), Some(3));
        assert_eq!(m.pool().ref_count(c0[1]), Some(1));
        assert_eq!(m.pool().ref_count(blocks[0]), Some(4));
        for &other in [parent, children[1], children[2]].iter() {
            assert_eq!(
                m.block_table(other).unwrap(),
                &blocks[..],
                "others unaffected"
            );
            assert_eq!(m.seq_len(other).unwrap(), len);
        }
        let slots = out.apply_to(&mut store).unwrap();
        assert_eq!(
            slots,
            vec![Slot {
                block: c0[1],
                offset: 1
            }]
        );
        for layer in 0..3 {
            let x = (100 * layer + bs) as f32;
            assert_eq!(&store.k_block(layer, c0[1]).unwrap()[..2], &[x, -x]);
            assert_eq!(&store.v_block(layer, c0[1]).unwrap()[..2], &[x + 0.5, -x]);
        }
        // Its second append writes in place.
        assert!(
            m.append_slots(children[0], 1)
                .unwrap()
                .pending_copy()
                .is_none()
        );
        check_invariants(&m);

        // The other sharers copy in turn; the last one writes in place.
        for &c in &children[1..] {
            assert!(m.append_slots(c, 1).unwrap().pending_copy().is_some());
        }
        assert_eq!(m.pool().ref_count(shared_last), Some(1));
        let last = m.append_slots(parent, 1).unwrap();
        assert!(last.pending_copy().is_none());
        assert_eq!(m.block_table(parent).unwrap(), &blocks[..]);
        let slots = last.apply(|_| Err("no copy expected")).unwrap();
        assert_eq!(
            slots,
            vec![Slot {
                block: shared_last,
                offset: 1
            }]
        );
        check_invariants(&m);
    }
}

#[test]
fn reserved_room_holds_the_blocks_without_changing_anything_else() {
    let bs = 4;
    let mut m = KvManager::new(16, bs).unwrap();
    let (p, _) = m.add_sequence(&toks(0, 6), BASE).unwrap();
    let c = m.fork(p, 1).unwrap()[0];
    let free = m.free_blocks();
    m.reserve(c, 20).unwrap();
    assert_eq!(m.free_blocks(), free, "reserving takes no blocks");
    assert_eq!(m.seq_len(c).unwrap(), 6);
    let room = m.table(c).unwrap().room();
    assert!(
        room > 20 / bs,
        "room for 20 positions and a copy-on-write: {room}"
    );
    // Fourteen appends, the copy-on-write and three new blocks among them: the list
    // never moves.
    for i in 0..14 {
        m.append_slots(c, 1)
            .unwrap()
            .apply(|_: &CopyBlock| Ok::<_, KvError>(()))
            .unwrap();
        assert_eq!(m.table(c).unwrap().room(), room, "append {i}");
    }
    assert_eq!(m.seq_len(c).unwrap(), 20);
    assert_eq!(m.block_table(c).unwrap().len(), 5);
    assert_eq!(m.free_blocks(), free - 4);
    // Room is capped by the pool (only the id list grows); an unknown sequence is named.
    m.reserve(c, usize::MAX).unwrap();
    assert!(m.table(c).unwrap().room() <= 17);
    assert_eq!(
        m.reserve(SeqId(999), 8),
        Err(KvError::UnknownSequence { seq: SeqId(999) })
    );
    check_invariants(&m);
}

#[test]
fn copy_on_write_that_also_crosses_a_boundary() {
    let bs = 4;
    let mut m = KvManager::new(16, bs).unwrap();
    let (p, _) = m.add_sequence(&toks(0, 6), BASE).unwrap();
    let c = m.fork(p, 1).unwrap()[0];
    let free = m.free_blocks();
    let out = m.append_slots(c, 5).unwrap(); // 6 -> 11: copy block 1, one new block
    assert_eq!(m.free_blocks(), free - 2);
    let copy = *out.pending_copy().unwrap();
    assert_eq!(copy.len, 2);
    let t = m.block_table(c).unwrap().to_vec();
    assert_eq!(t.len(), 3);
    assert_eq!(copy.dst, t[1]);
    let mut ran = Vec::new();
    let slots = out
        .apply(|c: &CopyBlock| {
            ran.push(*c);
            Ok::<_, KvError>(())
        })
        .unwrap();
    assert_eq!(ran, vec![copy], "apply runs the copy exactly once");
    let offs: Vec<(BlockId, usize)> = slots.iter().map(|s| (s.block, s.offset)).collect();
    assert_eq!(
        offs,
        vec![(t[1], 2), (t[1], 3), (t[2], 0), (t[2], 1), (t[2], 2)]
    );
    check_invariants(&m);
}

#[test]
fn full_shared_last_block_needs_no_copy() {
    for bs in [4usize, 16] {
        let mut m = KvManager::new(16, bs).unwrap();
        let (parent, _) = m.add_sequence(&toks(0, 2 * bs), BASE).unwrap();
        let blocks = m.block_table(parent).unwrap().to_vec();
        let children = m.fork(parent, 3).unwrap();
        let free = m.free_blocks();
        let out = m.append_slots(children[1], 1).unwrap();
        assert!(out.pending_copy().is_none());
        assert_eq!(m.free_blocks(), free - 1);
        let t = m.block_table(children[1]).unwrap();
        assert_eq!(&t[..2], &blocks[..]);
        assert_eq!(
            out.peek_slots(),
            &[Slot {
                block: t[2],
                offset: 0
            }]
        );
        assert!(refs(&m, &blocks).iter().all(|&r| r == 4));
        check_invariants(&m);
    }
}

#[test]
fn cached_prefix_is_reused_across_requests() {
    for bs in [4usize, 16] {
        let mut m = KvManager::new(32, bs).unwrap();
        let prompt = toks(1000, 2 * bs + 3);
        let (a, cached) = m.add_sequence(&prompt, BASE).unwrap();
        assert_eq!(cached, 0);
        assert_eq!(
            m.cached_prefix_len(&prompt, BASE),
            0,
            "nothing before commit"
        );
        assert_eq!(m.commit_full_blocks(a, &prompt).unwrap(), 2);
        let free = m.free_blocks();
        let (b, cached) = m.add_sequence(&prompt, BASE).unwrap();
        assert_eq!(cached, 2 * bs);
        assert_eq!(
            m.free_blocks(),
            free - 1,
            "only the tail block is allocated"
        );
        let (ta, tb) = (m.block_table(a).unwrap(), m.block_table(b).unwrap());
        assert_eq!(&ta[..2], &tb[..2]);
        assert_ne!(ta[2], tb[2]);
        assert_eq!(m.table(b).unwrap().num_committed(), 2);
        check_invariants(&m);
        // Both freed: the cached blocks wait in the LRU queue and are revived.
        m.free_sequence(a).unwrap();
        m.free_sequence(b).unwrap();
        assert_eq!(m.pool().num_evictable(), 2);
        let (c, cached) = m.add_sequence(&prompt, BASE).unwrap();
        assert_eq!(cached, 2 * bs);
        assert_eq!(m.pool().num_evictable(), 0);
        m.free_sequence(c).unwrap();
        check_invariants(&m);
    }
}

#[test]
fn chosen_and_rejected_share_the_prompt_then_diverge() {
    let bs = 4;
    let mut m = KvManager::new(32, bs).unwrap();
    let prompt = toks(1, 9); // 2 full blocks + 1
    let chosen: Vec<u32> = prompt.iter().copied().chain([50, 51, 52, 53, 54]).collect();
    let rejected: Vec<u32> = prompt.iter().copied().chain([60, 61, 62]).collect();
    let (a, cached) = m.add_sequence(&chosen, BASE).unwrap();
    assert_eq!(cached, 0);
    m.commit_full_blocks(a, &chosen).unwrap();
    assert_eq!(m.table(a).unwrap().num_committed(), 3);
    let (b, cached) = m.add_sequence(&rejected, BASE).unwrap();
    assert_eq!(cached, 8, "the prompt's full blocks only; block 2 diverges");
    let (ta, tb) = (m.block_table(a).unwrap(), m.block_table(b).unwrap());
    assert_eq!(&ta[..2], &tb[..2]);
    assert_ne!(ta[2], tb[2]);
    assert_eq!(m.pool().ref_count(ta[0]), Some(2));
    assert_eq!(m.pool().ref_count(ta[2]), Some(1));
    m.commit_full_blocks(b, &rejected).unwrap();
    assert_eq!(m.table(b).unwrap().num_committed(), 3);
    // Each continuation now hits its own third block.
    let mut more = chosen.clone();
    more.push(99);
    assert_eq!(m.cached_prefix_len(&more, BASE), 12);
    check_invariants(&m);
}

#[test]
fn different_prefix_keys_never_share() {
    let bs = 4;
    let mut m = KvManager::new(32, bs).unwrap();
    let prompt = toks(5, 10);
    let lora = PrefixKey { adapter: 0xada };
    let (a, _) = m.add_sequence(&prompt, BASE).unwrap();
    m.commit_full_blocks(a, &prompt).unwrap();
    assert_eq!(m.cached_prefix_len(&prompt, lora), 0);
    let (b, cached) = m.add_sequence(&prompt, lora).unwrap();
    assert_eq!(cached, 0);
    let (ta, tb) = (m.block_table(a).unwrap(), m.block_table(b).unwrap());
    assert!(ta.iter().all(|x| !tb.contains(x)));
    m.commit_full_blocks(b, &prompt).unwrap();
    assert_eq!(m.table(b).unwrap().key(), lora);
    assert_eq!(m.cached_prefix_len(&prompt, lora), 8);
    assert_eq!(m.cached_prefix_len(&prompt, BASE), 8);
    let (c, cached) = m.add_sequence(&prompt, lora).unwrap();
    assert_eq!(cached, 8);
    assert_eq!(
        &m.block_table(c).unwrap()[..2],
        &m.block_table(b).unwrap()[..2]
    );
    check_invariants(&m);
}

#[test]
fn eviction_takes_least_recently_freed_cached_blocks() {
    let bs = 4;
    let mut m = KvManager::new(7, bs).unwrap();
    // Three one-block prompts (+1 token so the full block is reusable), committed.
    let prompts: Vec<Vec<u32>> = (0..3).map(|i| toks(100 * i + 1, bs + 1)).collect();
    let mut seqs = Vec::new();
    for p in &prompts {
        let (s, _) = m.add_sequence(p, BASE).unwrap();
        m.commit_full_blocks(s, p).unwrap();
        seqs.push(s);
    }
    assert_eq!(m.free_blocks(), 1);
    let full: Vec<BlockId> = seqs.iter().map(|&s| m.block_table(s).unwrap()[0]).collect();
    // Free in the order 1, 0, 2: the LRU queue holds the cached full blocks in that order;
    // the uncached tails go to the plain free list.
    for i in [1, 0, 2] {
        m.free_sequence(seqs[i]).unwrap();
    }
    assert_eq!(m.pool().num_evictable(), 3);
    assert_eq!(m.free_blocks(), 7);
    assert_eq!(m.pool().evictable_order(), vec![full[1], full[0], full[2]]);
    check_invariants(&m);
    // 5 blocks: the 4 plain free blocks first, then the least recently freed cached one.
    let (big, cached) = m.add_sequence(&toks(9000, 5 * bs), BASE).unwrap();
    assert_eq!(cached, 0);
    let t = m.block_table(big).unwrap();
    assert!(t.contains(&full[1]) && !t.contains(&full[0]) && !t.contains(&full[2]));
    assert_eq!(m.pool().evictable_order(), vec![full[0], full[2]]);
    assert_eq!(m.pool().cached_hash(full[1]), None);
    assert_eq!(
        m.cached_prefix_len(&prompts[1], BASE),
        0,
        "evicted hash is gone"
    );
    assert_eq!(m.cached_prefix_len(&prompts[0], BASE), bs);
    assert_eq!(m.cached_prefix_len(&prompts[2], BASE), bs);
    check_invariants(&m);
    // Reviving full[2] takes it off the queue; its fresh tail block evicts full[0].
    let (keep, cached) = m.add_sequence(&prompts[2], BASE).unwrap();
    assert_eq!(cached, bs);
    assert_eq!(m.block_table(keep).unwrap()[0], full[2]);
    assert_eq!(m.block_table(keep).unwrap()[1], full[0]);
    assert_eq!(
        m.cached_prefix_len(&prompts[0], BASE),
        0,
        "evicted hash is gone"
    );
    assert_eq!(m.pool().num_evictable(), 0);
    check_invariants(&m);
    // A referenced cached block is never evicted: the pool is full, so an error.
    let before = snapshot(&m);
    assert_eq!(
        m.add_sequence(&toks(7000, 1), BASE),
        Err(KvError::CapacityExhausted { needed: 1, free: 0 })
    );
    assert_eq!(snapshot(&m), before);
    assert_eq!(m.pool().ref_count(full[2]), Some(1));
    assert_eq!(m.cached_prefix_len(&prompts[2], BASE), bs);
}

#[test]
fn capacity_exhausted_leaves_state_unchanged() {
    let bs = 4;
    let mut m = KvManager::new(5, bs).unwrap();
    let prompt = toks(1, 9); // 3 blocks
    let (a, _) = m.add_sequence(&prompt, BASE).unwrap();
    m.commit_full_blocks(a, &prompt).unwrap();
    let c = m.fork(a, 1).unwrap()[0]; // a and c share the partial last block
    let before = snapshot(&m);

    // add_sequence: 3 blocks but 2 free.
    assert_eq!(
        m.add_sequence(&toks(500, 12), BASE),
        Err(KvError::CapacityExhausted { needed: 3, free: 2 })
    );
    assert_eq!(snapshot(&m), before);
    // append_slots: CoW (1) + 2 new blocks = 3 needed, 2 free.
    assert_eq!(
        m.append_slots(c, 8),
        Err(KvError::CapacityExhausted { needed: 3, free: 2 })
    );
    assert_eq!(snapshot(&m), before);
    check_invariants(&m);

    // Cached-but-unreferenced hits do not count as free once revived.
    let mut m = KvManager::new(4, bs).unwrap();
    let p = toks(1, 9);
    let (a, _) = m.add_sequence(&p, BASE).unwrap();
    m.commit_full_blocks(a, &p).unwrap();
    m.free_sequence(a).unwrap();
    let (_hold, _) = m.add_sequence(&toks(700, 3), BASE).unwrap();
    // free = 1 plain + 2 evictable; a 5-block request reviving 2 needs 3 of the 1 left.
    let long: Vec<u32> = p[..8].iter().copied().chain(700..712).collect();
    let before = snapshot(&m);
    assert_eq!(
        m.add_sequence(&long, BASE),
        Err(KvError::CapacityExhausted { needed: 3, free: 1 })
    );
    assert_eq!(snapshot(&m), before);
    check_invariants(&m);
}

#[test]
fn storage_copy_block_copies_exactly_len_rows_in_every_layer() {
    let (layers, blocks, bs, dim) = (3, 4, 4, 6);
    for len in 0..=bs {
        let mut s = KvStorage::new(layers, blocks, bs, dim).unwrap();
        for layer in 0..layers {
            for b in 0..blocks as u32 {
                for r in 0..bs {
                    let x: Vec<f32> = (0..dim)
                        .map(|d| (1000 * layer + 100 * b as usize + 10 * r + d) as f32)
                        .collect();
                    let y: Vec<f32> = x.iter().map(|v| -v).collect();
                    s.write(layer, BlockId(b), r, &x, &y).unwrap();
                }
            }
        }
        let orig: Vec<(Vec<f32>, Vec<f32>)> = (0..layers)
            .flat_map(|l| (0..blocks as u32).map(move |b| (l, b)))
            .map(|(l, b)| {
                (
                    s.k_block(l, BlockId(b)).unwrap().to_vec(),
                    s.v_block(l, BlockId(b)).unwrap().to_vec(),
                )
            })
            .collect();
        s.copy_block(BlockId(1), BlockId(3), len).unwrap();
        for l in 0..layers {
            for b in 0..blocks {
                let (k0, v0) = &orig[l * blocks + b];
                let k = s.k_block(l, BlockId(b as u32)).unwrap();
                let v = s.v_block(l, BlockId(b as u32)).unwrap();
                if b == 3 {
                    let (ks, vs) = &orig[l * blocks + 1];
                    let n = len * dim;
                    assert_eq!(&k[..n], &ks[..n], "layer {l}: copied K rows");
                    assert_eq!(&v[..n], &vs[..n], "layer {l}: copied V rows");
                    assert_eq!(&k[n..], &k0[n..], "layer {l}: rows past len untouched");
                    assert_eq!(&v[n..], &v0[n..], "layer {l}: rows past len untouched");
                } else {
                    assert_eq!(k, &k0[..], "layer {l} block {b} untouched");
                    assert_eq!(v, &v0[..], "layer {l} block {b} untouched");
                }
            }
        }
    }
}

/// The K/V "content" of position p: depends on the whole prefix, exact in f32.
fn content(tokens: &[u32], p: usize) -> f32 {
    let mut h: u32 = 0x811c_9dc5;
    for &t in &tokens[..=p] {
        h = (h ^ t).wrapping_mul(0x0100_0193);
    }
    (h >> 8) as f32
}

fn write_positions(m: &KvManager, st: &mut KvStorage, seq: SeqId, tokens: &[u32], from: usize) {
    for p in from..tokens.len() {
        let s = m.slot(seq, p).unwrap();
        let x = content(tokens, p);
        st.write(0, s.block, s.offset, &[x], &[-x]).unwrap();
    }
}

fn check_content(m: &KvManager, st: &KvStorage, seq: SeqId, tokens: &[u32]) {
    for p in 0..tokens.len() {
        let s = m.slot(seq, p).unwrap();
        let k = st.k_block(0, s.block).unwrap()[s.offset];
        let v = st.v_block(0, s.block).unwrap()[s.offset];
        assert_eq!(k, content(tokens, p), "{seq} position {p}: wrong K");
        assert_eq!(v, -content(tokens, p), "{seq} position {p}: wrong V");
    }
}

#[test]
fn random_operations_keep_invariants_and_content() {
    for (seed, bs, num_blocks) in [(1u64, 4usize, 24usize), (2, 16, 12), (3, 4, 7)] {
        let mut rng = Rng(seed);
        let mut m = KvManager::new(num_blocks, bs).unwrap();
        let mut st = KvStorage::new(1, num_blocks, bs, 1).unwrap();
        let mut live: Vec<(SeqId, Vec<u32>)> = Vec::new();
        let prompts: Vec<Vec<u32>> = (0..3).map(|i| toks(1000 * i + 1, 3 * bs + 2)).collect();
        let (mut hits, mut cows, mut exhausted) = (0, 0, 0);
        for step in 0..3000 {
            let before = snapshot(&m);
            let op = rng.below(10);
            let result: Result<(), KvError> = match op {
                0..=2 => {
                    let base = &prompts[rng.below(prompts.len())];
                    let mut t: Vec<u32> = base[..1 + rng.below(base.len())].to_vec();
                    for _ in 0..rng.below(2 * bs) {
                        t.push(rng.below(5) as u32);
                    }
                    let key = PrefixKey {
                        adapter: (rng.below(4) == 0) as u64,
                    };
                    m.add_sequence(&t, key).map(|(s, cached)| {
                        assert_eq!(cached % bs, 0);
                        assert!(cached < t.len());
                        hits += usize::from(cached > 0);
                        // The reused part must already hold this prompt's content.
                        check_content(&m, &st, s, &t[..cached]);
                        write_positions(&m, &mut st, s, &t, cached);
                        live.push((s, t));
                    })
                }
                3..=5 if !live.is_empty() => {
                    let i = rng.below(live.len());
                    let n = 1 + rng.below(bs + 2);
                    let (s, t) = &mut live[i];
                    let from = t.len();
                    match m.append_slots(*s, n) {
                        Ok(out) => {
                            cows += usize::from(out.pending_copy().is_some());
                            let slots = out.apply_to(&mut st).unwrap();
                            assert_eq!(slots.len(), n);
                            for _ in 0..n {
                                t.push(rng.below(5) as u32);
                            }
                            for (j, sl) in slots.iter().enumerate() {
                                let x = content(t, from + j);
                                st.write(0, sl.block, sl.offset, &[x], &[-x]).unwrap();
                            }
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                }
                6 if !live.is_empty() => {
                    let i = rng.below(live.len());
                    let k = 1 + rng.below(3);
                    let (s, t) = live[i].clone();
                    m.fork(s, k).map(|kids| {
                        for c in kids {
                            live.push((c, t.clone()));
                        }
                    })
                }
                7 if !live.is_empty() => {
                    let (s, t) = &live[rng.below(live.len())];
                    m.commit_full_blocks(*s, t).map(|_| ())
                }
                8 | 9 if !live.is_empty() => {
                    let (s, _) = live.swap_remove(rng.below(live.len()));
                    m.free_sequence(s)
                }
                _ => Ok(()),
            };
            match result {
                Ok(()) => {}
                Err(KvError::CapacityExhausted { needed, free }) => {
                    exhausted += 1;
                    assert!(needed > free);
                    assert_eq!(snapshot(&m), before, "step {step}: error changed state");
                }
                Err(e) => panic!("step {step}: unexpected {e}"),
            }
            check_invariants(&m);
            if step % 50 == 0 {
                for (s, t) in &live {
                    check_content(&m, &st, *s, t);
                }
            }
        }
        for (s, t) in &live {
            check_content(&m, &st, *s, t);
        }
        assert!(
            hits > 0 && cows > 0 && exhausted > 0,
            "seed {seed}: {hits} {cows} {exhausted}"
        );
        for (s, _) in live.drain(..) {
            m.free_sequence(s).unwrap();
        }
        assert_eq!(m.free_blocks(), num_blocks);
        check_invariants(&m);
    }
}
