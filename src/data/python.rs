//! The Python semantics the original training scripts' class tables rest on: float floor
//! division and modulo, and the order in which CPython iterates a set of integer tuples (the
//! order `list(set)` gives the classes of a group).

/// Python's `x // y` on floats (`float_floor_div` in CPython's floatobject.c): the floor of the
/// quotient computed from the exact remainder, so that `x // y * y + x % y == x` as far as
/// rounding allows.
pub(crate) fn floor_div(x: f64, y: f64) -> f64 {
    let remainder = x % y;
    let mut quotient = (x - remainder) / y;
    if remainder != 0.0 && ((y < 0.0) != (remainder < 0.0)) {
        quotient -= 1.0;
    }
    if quotient == 0.0 {
        return 0f64.copysign(x / y);
    }
    let floored = quotient.floor();
    if quotient - floored > 0.5 {
        floored + 1.0
    } else {
        floored
    }
}

/// Python's `x % y` on floats: the remainder with the sign of `y` (a negative `x` wraps to
/// `x + y`, which rounds to `y` itself when `x` is tiny).
pub(crate) fn modulo(x: f64, y: f64) -> f64 {
    let remainder = x % y;
    if remainder == 0.0 {
        0f64.copysign(y)
    } else if (y < 0.0) != (remainder < 0.0) {
        remainder + y
    } else {
        remainder
    }
}

/// CPython's `hash(int)`: the value modulo the Mersenne prime 2^61 - 1 with the sign kept, -1
/// turned into -2 (as the unsigned word it is mixed in as).
fn int_hash(value: i64) -> u64 {
    const MODULUS: u64 = (1 << 61) - 1;
    let magnitude = value.unsigned_abs() % MODULUS;
    let hash = if value < 0 {
        -(magnitude as i64)
    } else {
        magnitude as i64
    };
    (if hash == -1 { -2 } else { hash }) as u64
}

/// CPython's (3.8 and later) `hash(tuple)` of integers: the xxHash-based mix of tupleobject.c.
pub(crate) fn tuple_hash(items: &[i64]) -> u64 {
    const PRIME_1: u64 = 11400714785074694791;
    const PRIME_2: u64 = 14029467366897019727;
    const PRIME_5: u64 = 2870177450012600261;
    let mut acc = PRIME_5;
    for &item in items {
        acc = acc.wrapping_add(int_hash(item).wrapping_mul(PRIME_2));
        acc = acc.rotate_left(31);
        acc = acc.wrapping_mul(PRIME_1);
    }
    acc = acc.wrapping_add(items.len() as u64 ^ (PRIME_5 ^ 3527539));
    if acc == u64::MAX {
        1546275796
    } else {
        acc
    }
}

/// A CPython set (setobject.c: open addressing, 9 linear probes then perturbed jumps, a table
/// that grows to 4x its used slots once 3/5 full) holding the indices of keys added in order,
/// so that `order()` lists them as iterating the real set would. Only additions, as the scripts
/// build their sets.
pub(crate) struct SetOrder {
    /// Slots: (hash, key index) or empty.
    table: Vec<Option<(u64, usize)>>,
    fill: usize,
}

const LINEAR_PROBES: usize = 9;
const PERTURB_SHIFT: u32 = 5;
const MIN_SIZE: usize = 8;

impl SetOrder {
    pub(crate) fn new() -> SetOrder {
        SetOrder {
            table: vec![None; MIN_SIZE],
            fill: 0,
        }
    }

    /// Adds key `index` with `hash`; `same(other)` tells whether the key already held at
    /// `other` equals it (then nothing changes, as when Python adds an equal tuple again).
    pub(crate) fn add(&mut self, hash: u64, index: usize, same: impl Fn(usize) -> bool) {
        let mask = self.table.len() - 1;
        let mut i = hash as usize & mask;
        let mut perturb = hash;
        loop {
            let probes = if i + LINEAR_PROBES <= mask {
                LINEAR_PROBES
            } else {
                0
            };
            for slot in i..=i + probes {
                match self.table[slot] {
                    None => {
                        self.table[slot] = Some((hash, index));
                        self.fill += 1;
                        if self.fill * 5 >= mask * 3 {
                            self.resize(self.fill * if self.fill > 50000 { 2 } else { 4 });
                        }
                        return;
                    }
                    Some((h, other)) if h == hash && same(other) => return,
                    Some(_) => {}
                }
            }
            perturb >>= PERTURB_SHIFT;
            i = next_probe(i, perturb, mask);
        }
    }

    /// The smallest power-of-two table above `min_used` slots, refilled in the old table's order.
    fn resize(&mut self, min_used: usize) {
        let mut size = MIN_SIZE;
        while size <= min_used {
            size <<= 1;
        }
        let old = std::mem::replace(&mut self.table, vec![None; size]);
        let mask = size - 1;
        for (hash, index) in old.into_iter().flatten() {
            let mut i = hash as usize & mask;
            let mut perturb = hash;
            'probe: loop {
                let probes = if i + LINEAR_PROBES <= mask {
                    LINEAR_PROBES
                } else {
                    0
                };
                for slot in i..=i + probes {
                    if self.table[slot].is_none() {
                        self.table[slot] = Some((hash, index));
                        break 'probe;
                    }
                }
                perturb >>= PERTURB_SHIFT;
                i = next_probe(i, perturb, mask);
            }
        }
    }

    /// The key indices in iteration order.
    pub(crate) fn order(&self) -> Vec<usize> {
        self.table
            .iter()
            .flatten()
            .map(|&(_, index)| index)
            .collect()
    }
}

/// CPython's open-addressing step: `(5 i + 1 + perturb) mod size`.
fn next_probe(i: usize, perturb: u64, mask: usize) -> usize {
    i.wrapping_mul(5)
        .wrapping_add(1)
        .wrapping_add(perturb as usize)
        & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_division_and_modulo_follow_python() {
        // values checked in CPython 3.11
        assert_eq!(floor_div(551234.56, 10.0), 55123.0);
        assert_eq!(floor_div(-7.5, 2.0), -4.0);
        assert_eq!(floor_div(359.5, 30.0), 11.0);
        assert_eq!(floor_div(0.0, 30.0), 0.0);
        assert!(floor_div(-0.0, 30.0).is_sign_negative());
        assert_eq!(modulo(-1.0, 360.0), 359.0);
        assert_eq!(modulo(-1e-20, 360.0), 360.0);
        assert_eq!(modulo(725.0, 360.0), 5.0);
        assert_eq!(modulo(-0.0, 360.0), 0.0);
        assert!(modulo(-0.0, 360.0).is_sign_positive());
    }

    #[test]
    fn tuple_hashes_are_cpythons() {
        // hash(t) in CPython 3.11, as unsigned 64-bit words
        assert_eq!(tuple_hash(&[1, 2, 3]), 529344067295497451);
        assert_eq!(tuple_hash(&[]), 5740354900026072187);
        assert_eq!(tuple_hash(&[-1]), 8078679518589016365);
        assert_eq!(tuple_hash(&[551230, 4180010, 90]), 14700473930397670213);
    }

    #[test]
    fn set_order_is_cpythons() {
        // list({(0, i) for i in range(20)} built in order) in CPython 3.11
        let keys: Vec<[i64; 2]> = (0..20).map(|i| [0, i]).collect();
        let mut set = SetOrder::new();
        for (index, key) in keys.iter().enumerate() {
            set.add(tuple_hash(key), index, |other| keys[other] == *key);
        }
        let expected = [
            2, 5, 8, 14, 11, 17, 1, 7, 4, 10, 16, 13, 19, 0, 3, 9, 6, 12, 15, 18,
        ];
        assert_eq!(set.order(), expected);
    }
}
