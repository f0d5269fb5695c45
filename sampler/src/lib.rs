//! cloudrm-sampler: logits processors and seeded sampling. The reference semantics that
//! the GPU sampling kernel reproduces. (filled in by the CLoud inference issue)

/// Index of the largest logit; ties go to the lowest index. `None` for an empty slice.
pub fn argmax(logits: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in logits.iter().enumerate() {
        match best {
            Some((_, b)) if !(x > b) => {}
            _ => best = Some((i, x)),
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_picks_first_max() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), Some(1));
        assert_eq!(argmax(&[]), None);
        assert_eq!(argmax(&[f32::NEG_INFINITY, -5.0]), Some(1));
    }
}
