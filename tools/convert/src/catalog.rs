//! The catalog of official checkpoints (`weights/catalog.tsv`), compiled in so that
//! `convert --list` works from an installed binary.

/// The catalog file, tab-separated, first line the header.
pub const CATALOG: &str = include_str!("../../../weights/catalog.tsv");

/// One catalog row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    pub name: &'a str,
    pub system: &'a str,
    pub backbone: &'a str,
    pub dim: &'a str,
    pub arch: &'a str,
    pub url: &'a str,
    pub recalls: &'a str,
}

/// The rows of the catalog, header excluded.
pub fn entries() -> Vec<Entry<'static>> {
    CATALOG
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut f = l.split('\t');
            let mut next = || f.next().unwrap_or("");
            Entry {
                name: next(),
                system: next(),
                backbone: next(),
                dim: next(),
                arch: next(),
                url: next(),
                recalls: next(),
            }
        })
        .collect()
}

/// The catalog as an aligned text table for `convert --list`.
pub fn table() -> String {
    let rows = entries();
    let w =
        |f: fn(&Entry<'static>) -> &'static str| rows.iter().map(|e| f(e).len()).max().unwrap_or(0);
    let (wn, ws, wb, wd, wa) = (
        w(|e| e.name),
        w(|e| e.system),
        w(|e| e.backbone),
        w(|e| e.dim),
        w(|e| e.arch),
    );
    let mut out = format!(
        "{:wn$}  {:ws$}  {:wb$}  {:>wd$}  {:wa$}  url / published recalls (R@1/R@5/R@10)\n",
        "name", "system", "backbone", "dim", "arch"
    );
    for e in &rows {
        out += &format!(
            "{:wn$}  {:ws$}  {:wb$}  {:>wd$}  {:wa$}  {}\n",
            e.name, e.system, e.backbone, e.dim, e.arch, e.url
        );
        if !e.recalls.is_empty() {
            // torchvision's classifiers have no recalls, only what they are for
            let label = if e.arch == "torchvision" {
                "note"
            } else {
                "recalls"
            };
            out += &format!(
                "{:w$}  {label}: {}\n",
                "",
                e.recalls,
                w = wn + ws + wb + wd + wa + 8
            );
        }
    }
    out
}
