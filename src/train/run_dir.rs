//! The files of a training run's folder that are not weights: `config.json` (every setting, read
//! back by `--resume`) and `metrics.jsonl` (one JSON object per line: steps and epochs).
//!
//! Both are flat JSON objects of strings, numbers and booleans, written and read here without a
//! JSON library: nothing nested is ever needed.

use crate::error::{Error, Result};
use crate::io::AtomicFile;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One JSON value of a flat object.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Text(String),
    Number(f64),
    Bool(bool),
}

impl Value {
    fn write(&self, out: &mut String) {
        match self {
            Value::Text(s) => {
                out.push('"');
                for c in s.chars() {
                    match c {
                        '"' => out.push_str("\\\""),
                        '\\' => out.push_str("\\\\"),
                        '\n' => out.push_str("\\n"),
                        '\t' => out.push_str("\\t"),
                        '\r' => out.push_str("\\r"),
                        c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                        c => out.push(c),
                    }
                }
                out.push('"');
            }
            // JSON has no NaN or infinity
            Value::Number(x) if !x.is_finite() => out.push_str("null"),
            // counts as integers
            Value::Number(x) if x.fract() == 0.0 && x.abs() < 1e15 => {
                out.push_str(&format!("{}", *x as i64))
            }
            // Rust's shortest round-trip form, so a value read back has the same bits
            Value::Number(x) => out.push_str(&format!("{x:?}")),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        }
    }
}

/// A flat JSON object on one line, keys in the given order.
pub fn json_line(fields: &[(&str, Value)]) -> String {
    let mut out = String::from("{");
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        Value::Text(k.to_string()).write(&mut out);
        out.push_str(": ");
        v.write(&mut out);
    }
    out.push('}');
    out
}

/// Reads a flat JSON object (strings, numbers, booleans; `null` is left out).
pub fn parse_json_object(text: &str) -> std::result::Result<BTreeMap<String, Value>, String> {
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
    };
    let mut out = BTreeMap::new();
    p.expect(b'{')?;
    if p.peek() == Some(b'}') {
        p.i += 1;
    } else {
        loop {
            let key = p.string()?;
            p.expect(b':')?;
            if let Some(v) = p.value()? {
                out.insert(key, v);
            }
            match p.next() {
                Some(b',') => continue,
                Some(b'}') => break,
                _ => return Err(format!("expected ',' or '}}' at byte {}", p.i)),
            }
        }
    }
    if p.peek().is_some() {
        return Err(format!("unexpected text after the object at byte {}", p.i));
    }
    Ok(out)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn skip_space(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_space();
        self.s.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek();
        self.i += 1;
        c
    }

    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        match self.next() {
            Some(x) if x == c => Ok(()),
            _ => Err(format!("expected '{}' at byte {}", c as char, self.i - 1)),
        }
    }

    fn string(&mut self) -> std::result::Result<String, String> {
        self.expect(b'"')?;
        let mut out = Vec::new();
        loop {
            let Some(&c) = self.s.get(self.i) else {
                return Err("unterminated string".into());
            };
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let e = *self.s.get(self.i).ok_or("unterminated escape")?;
                    self.i += 1;
                    match e {
                        b'"' | b'\\' | b'/' => out.push(e),
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        b'r' => out.push(b'\r'),
                        b'u' => {
                            let hex = self.s.get(self.i..self.i + 4).ok_or("short \\u escape")?;
                            let code =
                                u32::from_str_radix(std::str::from_utf8(hex).unwrap_or(""), 16)
                                    .map_err(|_| "bad \\u escape")?;
                            let ch = char::from_u32(code).ok_or("bad \\u escape")?;
                            out.extend(ch.to_string().bytes());
                            self.i += 4;
                        }
                        _ => return Err(format!("bad escape at byte {}", self.i - 1)),
                    }
                }
                c => out.push(c),
            }
        }
        String::from_utf8(out).map_err(|_| "a string is not UTF-8".into())
    }

    fn value(&mut self) -> std::result::Result<Option<Value>, String> {
        match self.peek() {
            Some(b'"') => Ok(Some(Value::Text(self.string()?))),
            Some(_) => {
                let start = self.i;
                while self.i < self.s.len() && !b",}".contains(&self.s[self.i]) {
                    self.i += 1;
                }
                let word = std::str::from_utf8(&self.s[start..self.i])
                    .map_err(|_| "not UTF-8")?
                    .trim();
                match word {
                    "true" => Ok(Some(Value::Bool(true))),
                    "false" => Ok(Some(Value::Bool(false))),
                    "null" => Ok(None),
                    w => w
                        .parse()
                        .map(|x| Some(Value::Number(x)))
                        .map_err(|_| format!("'{w}' is not a JSON value")),
                }
            }
            None => Err("the object ends early".into()),
        }
    }
}

/// `metrics.jsonl` of a run: appended line by line, flushed after each, so that it can be
/// followed while training runs.
pub struct Metrics {
    path: PathBuf,
    file: std::fs::File,
}

impl Metrics {
    /// Opens `path` for appending, first keeping only the lines of epochs before `from_epoch`
    /// (a resumed run repeats the epoch that was cut off, so its partial lines go).
    pub fn open(path: &Path, from_epoch: usize) -> Result<Metrics> {
        let io = |source| Error::Io {
            path: path.display().to_string(),
            source,
        };
        if path.exists() {
            let text = std::fs::read_to_string(path).map_err(io)?;
            let kept: String = text
                .lines()
                .filter(|line| {
                    parse_json_object(line)
                        .ok()
                        .and_then(|o| match o.get("epoch") {
                            Some(Value::Number(e)) => Some((*e as usize) < from_epoch),
                            _ => None,
                        })
                        .unwrap_or(false)
                })
                .flat_map(|l| [l, "\n"])
                .collect();
            let mut f = AtomicFile::create(path)?;
            f.write_bytes(kept.as_bytes())?;
            f.commit()?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        Ok(Metrics {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn write(&mut self, fields: &[(&str, Value)]) -> Result<()> {
        let line = json_line(fields) + "\n";
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|source| Error::Io {
                path: self.path.display().to_string(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_round_trip() {
        let fields = [
            ("method", Value::Text("cos\"place\\\n".into())),
            ("lr", Value::Number(1e-5)),
            ("epochs", Value::Number(50.0)),
            ("third", Value::Number(0.1 + 0.2)),
            ("amp", Value::Bool(false)),
        ];
        let line = json_line(&fields);
        let back = parse_json_object(&line).unwrap();
        for (k, v) in &fields {
            assert_eq!(&back[*k], v, "{line}");
        }
        assert!(parse_json_object("{\"a\": 1,}").is_err());
        assert!(parse_json_object("{\"a\": 1} x").is_err());
        assert_eq!(parse_json_object("{ }").unwrap().len(), 0);
        assert!(!parse_json_object("{\"nan\": null}")
            .unwrap()
            .contains_key("nan"));
    }
}
