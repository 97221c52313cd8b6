//! Interleaved repetitions, their summaries, and Markdown tables.

use anyhow::Result;

/// min / median / max of `n` measurements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Summary {
    /// Panics on an empty slice: every benchmark measures at least once.
    pub fn of(values: &[f64]) -> Summary {
        assert!(!values.is_empty(), "no measurements to summarise");
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Summary {
            n,
            min: sorted[0],
            median,
            max: sorted[n - 1],
        }
    }

    /// Min, median and max cells, each formatted by `format`.
    pub fn cells(&self, format: impl Fn(f64) -> String) -> [String; 3] {
        [format(self.min), format(self.median), format(self.max)]
    }
}

/// Element-wise `f(a, b)` of two per-repetition series (e.g. a variant's ratio to the baseline).
pub fn paired(a: &[f64], b: &[f64], f: impl Fn(f64, f64) -> f64) -> Vec<f64> {
    a.iter().zip(b).map(|(&a, &b)| f(a, b)).collect()
}

/// The order of `variants` in repetition `rep`: rotated left by `rep`.
fn rotated<V: Copy>(variants: &[V], rep: usize) -> Vec<V> {
    let start = rep % variants.len();
    variants[start..]
        .iter()
        .chain(&variants[..start])
        .copied()
        .collect()
}

/// Runs `warmups` unrecorded repetitions, then `reps` recorded ones; every repetition measures
/// each variant once, in rotating order, after waiting for the machine to be quiet when `settle`
/// (worth its second or more only for long repetitions). Returns, per variant (in `variants` order), the values
/// in repetition order, so that index `i` of every series comes from repetition `i`.
pub fn interleaved<V: Copy>(
    what: &str,
    variants: &[(V, &str)],
    warmups: usize,
    reps: usize,
    settle: bool,
    format: impl Fn(f64) -> String,
    mut measure: impl FnMut(V) -> Result<f64>,
) -> Result<Vec<Vec<f64>>> {
    let mut series = vec![Vec::with_capacity(reps); variants.len()];
    let indices: Vec<usize> = (0..variants.len()).collect();
    for rep in 0..warmups + reps {
        let label = if rep < warmups {
            format!("warm-up {}/{warmups}", rep + 1)
        } else {
            format!("repetition {}/{reps}", rep - warmups + 1)
        };
        if settle {
            super::machine::wait_for_quiet()?;
        }
        let mut line = Vec::new();
        for i in rotated(&indices, rep) {
            let (variant, name) = variants[i];
            let value = measure(variant)?;
            line.push(format!("{name} {}", format(value)));
            if rep >= warmups {
                series[i].push(value);
            }
        }
        eprintln!("xtask: bench: {what}: {label}: {}", line.join(", "));
    }
    Ok(series)
}

/// A Markdown table: the first column left-aligned, the others right-aligned.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: impl IntoIterator<Item = String>) {
        let row: Vec<String> = cells.into_iter().collect();
        assert_eq!(row.len(), self.header.len(), "table row width");
        self.rows.push(row);
    }

    pub fn markdown(&self) -> String {
        let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
        let rule: Vec<String> = (0..self.header.len())
            .map(|i| if i == 0 { ":--" } else { "--:" }.to_string())
            .collect();
        let mut text = line(&self.header);
        text.push_str(&line(&rule));
        for row in &self.rows {
            text.push_str(&line(row));
        }
        text
    }
}

pub fn seconds(s: f64) -> String {
    format!("{s:.2} s")
}

pub fn millis(s: f64) -> String {
    format!("{:.1} ms", s * 1e3)
}

pub fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1u64 << 20) as f64)
}

/// `×1.234`
pub fn ratio(r: f64) -> String {
    format!("×{r:.3}")
}

/// `+12.3%`
pub fn percent_change(r: f64) -> String {
    format!("{:+.1}%", (r - 1.0) * 100.0)
}

/// An integer with thousands separators (`1,572,864`).
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries() {
        let s = Summary::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.n, s.min, s.median, s.max), (3, 1.0, 2.0, 3.0));
        assert_eq!(Summary::of(&[4.0, 1.0, 2.0, 3.0]).median, 2.5);
        assert_eq!(Summary::of(&[7.0]).median, 7.0);
    }

    #[test]
    fn rotation_visits_every_order_start() {
        assert_eq!(rotated(&[0, 1, 2], 0), [0, 1, 2]);
        assert_eq!(rotated(&[0, 1, 2], 1), [1, 2, 0]);
        assert_eq!(rotated(&[0, 1, 2], 5), [2, 0, 1]);
    }

    #[test]
    fn interleaving_keeps_series_aligned() {
        let mut calls = Vec::new();
        let series = interleaved(
            "t",
            &[('a', "a"), ('b', "b")],
            1,
            2,
            false,
            |v| v.to_string(),
            |v| {
                calls.push(v);
                Ok(if v == 'a' { 1.0 } else { 2.0 })
            },
        )
        .unwrap();
        assert_eq!(calls, ['a', 'b', 'b', 'a', 'a', 'b']);
        assert_eq!(series, [vec![1.0, 1.0], vec![2.0, 2.0]]);
    }

    #[test]
    fn formatting() {
        assert_eq!(count(1_572_864), "1,572,864");
        assert_eq!(count(999), "999");
        assert_eq!(percent_change(1.0234), "+2.3%");
        let mut t = Table::new(&["x", "y"]);
        t.row(["a".to_string(), "1".to_string()]);
        assert_eq!(t.markdown(), "| x | y |\n| :-- | --: |\n| a | 1 |\n");
    }
}
