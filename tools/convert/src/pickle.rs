//! A pickle reader that never executes anything.
//!
//! Python's unpickler is a stack machine whose `GLOBAL` opcode imports any name and whose
//! `REDUCE` opcode calls it: loading a pickle runs arbitrary code. This machine runs the same
//! opcodes but gives them no power: a global is an inert `(module, name)` pair, `REDUCE` and
//! its relatives record "this callable applied to these arguments" as data, and
//! `BINPERSID` records the persistent id. Deciding what such a record means (a tensor, an
//! `OrderedDict`) is the job of `torch.rs`, which accepts only a short list of names.
//!
//! Compound values live in an arena and are referred to by index. The memo (`BINPUT` /
//! `BINGET`) therefore shares objects the way Python does, so a mutation after memoisation
//! is seen through every reference, and a pickle that fetches one object many times costs one
//! index per fetch rather than a deep copy: memory stays linear in the size of the pickle.
//! The machine is a loop, never recursive; code that walks the resulting graph must bound
//! its own depth because a pickle can build cycles.

use std::collections::HashMap;
use std::rc::Rc;

use crate::error::Result;
use crate::{bail, err};

/// Pickles larger than this are refused. Real `data.pkl` records are kilobytes (540 tensors
/// of SelaVPR take about 60 KB); the cap bounds the arena at a few hundred MiB.
pub const MAX_PICKLE_BYTES: usize = 64 << 20;

/// A value on the stack. Scalars are held inline; compound values are arena indices.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer that does not fit in i64: its little-endian two's-complement bytes.
    BigInt(Rc<[u8]>),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Ref(usize),
}

/// A compound value in the arena.
#[derive(Debug)]
pub enum Obj {
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Set(Vec<Value>),
    /// A global name: never imported, only remembered.
    Global {
        module: Rc<str>,
        name: Rc<str>,
    },
    /// `REDUCE`, `NEWOBJ`, `INST` or `OBJ`: a callable applied to arguments, recorded as data.
    /// Items that `SETITEM(S)` / `APPEND(S)` add to it and the `BUILD` state are kept too.
    Call {
        func: Value,
        args: Value,
        state: Option<Value>,
        dict_items: Vec<(Value, Value)>,
        list_items: Vec<Value>,
    },
    /// A persistent id (`PERSID` / `BINPERSID`): how torch refers to storages.
    PersId(Value),
}

/// The result of running one pickle.
pub struct Pickle {
    pub arena: Vec<Obj>,
    pub root: Value,
    /// How many bytes of the input the pickle occupied, up to and including `STOP`.
    pub consumed: usize,
}

impl Pickle {
    pub fn obj(&self, v: &Value) -> Option<&Obj> {
        match v {
            Value::Ref(i) => self.arena.get(*i),
            _ => None,
        }
    }

    /// `Some((module, name))` when `v` is a global.
    pub fn global<'a>(&'a self, v: &Value) -> Option<(&'a str, &'a str)> {
        match self.obj(v) {
            Some(Obj::Global { module, name }) => Some((module, name)),
            _ => None,
        }
    }

    /// A short human description of a value, for error messages.
    pub fn describe(&self, v: &Value) -> String {
        match v {
            Value::None => "None".into(),
            Value::Bool(b) => format!("bool {b}"),
            Value::Int(i) => format!("int {i}"),
            Value::BigInt(_) => "big int".into(),
            Value::Float(f) => format!("float {f}"),
            Value::Str(s) => format!("str {s:?}"),
            Value::Bytes(b) => format!("{} bytes", b.len()),
            Value::Ref(_) => match self.obj(v) {
                Some(Obj::Tuple(t)) => format!("tuple of {}", t.len()),
                Some(Obj::List(l)) => format!("list of {}", l.len()),
                Some(Obj::Dict(d)) => format!("dict of {}", d.len()),
                Some(Obj::Set(s)) => format!("set of {}", s.len()),
                Some(Obj::Global { module, name }) => format!("global {module}.{name}"),
                Some(Obj::Call { func, .. }) => match self.global(func) {
                    Some((m, n)) => format!("object built by {m}.{n}"),
                    None => "object built by a non-global callable".into(),
                },
                Some(Obj::PersId(_)) => "persistent id".into(),
                None => "dangling reference".into(),
            },
        }
    }
}

/// Runs the pickle that starts at `data[0]` and stops at its `STOP` opcode.
pub fn load(data: &[u8]) -> Result<Pickle> {
    Machine::new(data).run()
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    arena: Vec<Obj>,
}

impl<'a> Machine<'a> {
    fn new(data: &'a [u8]) -> Self {
        Machine {
            data,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            arena: Vec::new(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| err!("pickle is truncated at byte {}", self.pos))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    /// A length prefix; checked against the bytes left so that no allocation exceeds the input.
    fn len_prefix(&mut self, width: usize) -> Result<usize> {
        let n: u64 = match width {
            1 => self.u8()? as u64,
            4 => u32::from_le_bytes(self.le()?) as u64,
            _ => u64::from_le_bytes(self.le()?),
        };
        let left = (self.data.len() - self.pos) as u64;
        if n > left {
            bail!(
                "pickle declares a {n}-byte item at byte {} but only {left} bytes remain",
                self.pos
            );
        }
        Ok(n as usize)
    }

    /// A text line ending in `\n` (protocol 0 arguments), without the newline.
    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or_else(|| {
            err!(
                "pickle is truncated inside a text argument at byte {}",
                self.pos
            )
        })?;
        let s = std::str::from_utf8(&rest[..n])
            .map_err(|_| err!("pickle has a non-UTF-8 text argument at byte {}", self.pos))?;
        self.pos += n + 1;
        Ok(s)
    }

    fn alloc(&mut self, o: Obj) -> Value {
        self.arena.push(o);
        Value::Ref(self.arena.len() - 1)
    }

    fn push(&mut self, v: Value) {
        self.stack.push(v);
    }

    fn pop(&mut self) -> Result<Value> {
        // A value below the innermost mark belongs to an enclosing construct.
        if self.stack.len() <= self.marks.last().copied().unwrap_or(0) && !self.marks.is_empty() {
            bail!("pickle pops across a MARK at byte {}", self.pos);
        }
        self.stack
            .pop()
            .ok_or_else(|| err!("pickle stack underflow at byte {}", self.pos))
    }

    fn top_mut(&mut self) -> Result<&mut Value> {
        let pos = self.pos;
        self.stack
            .last_mut()
            .ok_or_else(|| err!("pickle stack underflow at byte {pos}"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| err!("pickle uses a MARK that was never set at byte {}", self.pos))?;
        Ok(self.stack.split_off(m))
    }

    fn memo_get(&mut self, idx: u32) -> Result<()> {
        let v = self
            .memo
            .get(&idx)
            .cloned()
            .ok_or_else(|| err!("pickle reads memo slot {idx} that was never written"))?;
        self.push(v);
        Ok(())
    }

    fn memo_put(&mut self, idx: u32) -> Result<()> {
        let v = self.top_mut()?.clone();
        self.memo.insert(idx, v);
        Ok(())
    }

    fn int_from_le(bytes: &[u8]) -> Value {
        if bytes.is_empty() {
            return Value::Int(0);
        }
        if bytes.len() <= 8 {
            let neg = bytes[bytes.len() - 1] & 0x80 != 0;
            let mut a = [if neg { 0xff } else { 0 }; 8];
            a[..bytes.len()].copy_from_slice(bytes);
            Value::Int(i64::from_le_bytes(a))
        } else {
            Value::BigInt(bytes.into())
        }
    }

    fn text_int(s: &str) -> Result<Value> {
        let t = s.trim_end_matches('L');
        match t {
            // Protocol 0 spells booleans as INT 01 / 00.
            "01" => Ok(Value::Bool(true)),
            "00" => Ok(Value::Bool(false)),
            _ => t.parse::<i64>().map(Value::Int).or_else(|_| {
                if !t.is_empty()
                    && t.trim_start_matches('-')
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                {
                    Ok(Value::BigInt(Rc::from(&[][..])))
                } else {
                    Err(err!("pickle has a malformed integer {s:?}"))
                }
            }),
        }
    }

    fn call(&mut self, func: Value, args: Value) -> Value {
        let is_ordered_dict = matches!(
            self.arena.get(match func { Value::Ref(i) => i, _ => usize::MAX }),
            Some(Obj::Global { module, name }) if &**module == "collections" && &**name == "OrderedDict"
        );
        let empty_args = matches!(self.obj_of(&args), Some(Obj::Tuple(t)) if t.is_empty());
        // `OrderedDict()` is how every state dict starts; make it a real dict so that the
        // SETITEMS that follow fill it. Everything else stays an inert record.
        if is_ordered_dict && empty_args {
            return self.alloc(Obj::Dict(Vec::new()));
        }
        self.alloc(Obj::Call {
            func,
            args,
            state: None,
            dict_items: Vec::new(),
            list_items: Vec::new(),
        })
    }

    fn obj_of(&self, v: &Value) -> Option<&Obj> {
        match v {
            Value::Ref(i) => self.arena.get(*i),
            _ => None,
        }
    }

    fn target(&mut self, what: &str) -> Result<usize> {
        match self.stack.last() {
            Some(Value::Ref(i)) => Ok(*i),
            Some(_) => bail!("pickle applies {what} to a scalar at byte {}", self.pos),
            None => bail!("pickle stack underflow at byte {}", self.pos),
        }
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<()> {
        if items.len() % 2 != 0 {
            bail!(
                "pickle SETITEMS has an odd number of values at byte {}",
                self.pos
            );
        }
        let t = self.target("SETITEMS")?;
        let mut pairs = Vec::with_capacity(items.len() / 2);
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            pairs.push((k, v));
        }
        match &mut self.arena[t] {
            Obj::Dict(d) => d.extend(pairs),
            Obj::Call { dict_items, .. } => dict_items.extend(pairs),
            _ => bail!(
                "pickle SETITEMS on a value that is not a dict at byte {}",
                self.pos
            ),
        }
        Ok(())
    }

    fn append_items(&mut self, items: Vec<Value>) -> Result<()> {
        let t = self.target("APPENDS")?;
        match &mut self.arena[t] {
            Obj::List(l) => l.extend(items),
            Obj::Set(s) => s.extend(items),
            Obj::Call { list_items, .. } => list_items.extend(items),
            _ => bail!(
                "pickle APPENDS on a value that is not a list at byte {}",
                self.pos
            ),
        }
        Ok(())
    }

    fn run(mut self) -> Result<Pickle> {
        loop {
            if self.pos > MAX_PICKLE_BYTES {
                bail!("pickle is larger than {} MiB", MAX_PICKLE_BYTES >> 20);
            }
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        bail!("unsupported pickle protocol {proto}");
                    }
                }
                // FRAME: a length hint for buffered readers; the opcodes follow inline.
                0x95 => {
                    self.take(8)?;
                }
                b'.' => {
                    let root = self.pop()?;
                    return Ok(Pickle {
                        arena: self.arena,
                        root,
                        consumed: self.pos,
                    });
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top_mut()?.clone();
                    self.push(v);
                }
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'I' => {
                    let l = self.line()?;
                    let v = Self::text_int(l)?;
                    self.push(v);
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.le()?);
                    self.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.le()?);
                    self.push(Value::Int(v as i64));
                }
                b'L' => {
                    let l = self.line()?;
                    let v = Self::text_int(l)?;
                    self.push(v);
                }
                0x8a => {
                    let n = self.len_prefix(1)?;
                    let v = Self::int_from_le(self.take(n)?);
                    self.push(v);
                }
                0x8b => {
                    let n = self.len_prefix(4)?;
                    let v = Self::int_from_le(self.take(n)?);
                    self.push(v);
                }
                b'F' => {
                    let l = self.line()?;
                    let v = l
                        .parse::<f64>()
                        .map_err(|_| err!("pickle has a malformed float {l:?}"))?;
                    self.push(Value::Float(v));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.le()?);
                    self.push(Value::Float(v));
                }
                // Python 2 str: kept as bytes (its encoding is unknown).
                b'S' => {
                    let l = self.line()?;
                    self.push(Value::Bytes(l.as_bytes().into()));
                }
                b'T' | b'U' | b'B' | b'C' | 0x8e | 0x96 => {
                    let w = match op {
                        b'U' | b'C' => 1,
                        b'T' | b'B' => 4,
                        _ => 8,
                    };
                    let n = self.len_prefix(w)?;
                    let b = self.take(n)?;
                    self.push(Value::Bytes(b.into()));
                }
                b'X' | 0x8c | 0x8d => {
                    let w = match op {
                        0x8c => 1,
                        b'X' => 4,
                        _ => 8,
                    };
                    let n = self.len_prefix(w)?;
                    let b = self.take(n)?;
                    // Python writes surrogates with "surrogatepass"; replacing them is harmless
                    // because no key we care about contains one.
                    let s = String::from_utf8_lossy(b);
                    self.push(Value::Str(s.into()));
                }
                b'V' => {
                    let l = self.line()?;
                    self.push(Value::Str(l.into()));
                }
                b')' => {
                    let v = self.alloc(Obj::Tuple(Vec::new()));
                    self.push(v);
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(Obj::Tuple(items));
                    self.push(v);
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    let v = self.alloc(Obj::Tuple(items));
                    self.push(v);
                }
                b']' => {
                    let v = self.alloc(Obj::List(Vec::new()));
                    self.push(v);
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(Obj::List(items));
                    self.push(v);
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append_items(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append_items(items)?;
                }
                b'}' => {
                    let v = self.alloc(Obj::Dict(Vec::new()));
                    self.push(v);
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(Obj::Dict(Vec::new()));
                    self.push(v);
                    self.set_items(items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                0x8f => {
                    let v = self.alloc(Obj::Set(Vec::new()));
                    self.push(v);
                }
                0x90 => {
                    let items = self.pop_mark()?;
                    self.append_items(items)?;
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    let v = self.alloc(Obj::Set(items));
                    self.push(v);
                }
                b'c' => {
                    let module: Rc<str> = self.line()?.into();
                    let name: Rc<str> = self.line()?.into();
                    let v = self.alloc(Obj::Global { module, name });
                    self.push(v);
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        bail!("pickle STACK_GLOBAL without two strings at byte {at}");
                    };
                    let v = self.alloc(Obj::Global { module, name });
                    self.push(v);
                }
                // REDUCE and NEWOBJ: record the call, never make it.
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.call(func, args);
                    self.push(v);
                }
                0x92 => {
                    let kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let both = self.alloc(Obj::Tuple(vec![args, kwargs]));
                    let v = self.call(cls, both);
                    self.push(v);
                }
                b'i' => {
                    let module: Rc<str> = self.line()?.into();
                    let name: Rc<str> = self.line()?.into();
                    let items = self.pop_mark()?;
                    let func = self.alloc(Obj::Global { module, name });
                    let args = self.alloc(Obj::Tuple(items));
                    let v = self.call(func, args);
                    self.push(v);
                }
                b'o' => {
                    let mut items = self.pop_mark()?;
                    if items.is_empty() {
                        bail!("pickle OBJ without a class at byte {at}");
                    }
                    let func = items.remove(0);
                    let args = self.alloc(Obj::Tuple(items));
                    let v = self.call(func, args);
                    self.push(v);
                }
                b'b' => {
                    let state = self.pop()?;
                    let t = self.target("BUILD")?;
                    // BUILD on an OrderedDict sets attributes such as `_metadata` (per-module
                    // versions), which nothing here needs; on a recorded call it is kept.
                    if let Obj::Call { state: s, .. } = &mut self.arena[t] {
                        *s = Some(state);
                    }
                }
                b'P' => {
                    let l = self.line()?;
                    let id = Value::Str(l.into());
                    let v = self.alloc(Obj::PersId(id));
                    self.push(v);
                }
                b'Q' => {
                    let id = self.pop()?;
                    let v = self.alloc(Obj::PersId(id));
                    self.push(v);
                }
                b'p' => {
                    let l = self.line()?;
                    let idx = l
                        .parse::<u32>()
                        .map_err(|_| err!("pickle has a malformed memo index {l:?}"))?;
                    self.memo_put(idx)?;
                }
                b'q' => {
                    let idx = self.u8()? as u32;
                    self.memo_put(idx)?;
                }
                b'r' => {
                    let idx = u32::from_le_bytes(self.le()?);
                    self.memo_put(idx)?;
                }
                0x94 => {
                    let idx = self.memo.len() as u32;
                    self.memo_put(idx)?;
                }
                b'g' => {
                    let l = self.line()?;
                    let idx = l
                        .parse::<u32>()
                        .map_err(|_| err!("pickle has a malformed memo index {l:?}"))?;
                    self.memo_get(idx)?;
                }
                b'h' => {
                    let idx = self.u8()? as u32;
                    self.memo_get(idx)?;
                }
                b'j' => {
                    let idx = u32::from_le_bytes(self.le()?);
                    self.memo_get(idx)?;
                }
                0x82..=0x84 => bail!("pickle uses the extension registry (opcode 0x{op:02x}), which checkpoints never do"),
                0x97 | 0x98 => bail!("pickle uses out-of-band buffers (opcode 0x{op:02x}), which checkpoints never do"),
                _ => bail!("invalid pickle opcode 0x{op:02x} at byte {at}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memo_shares_objects_so_later_mutation_is_visible() {
        // EMPTY_DICT BINPUT 0, EMPTY_LIST, BINGET 0 -> append the dict to the list,
        // then SETITEM into the dict through the stack... build: [d] where d gets k=1 after.
        // ]  } q0 a  h0 X'k' K1 s 0 .   -> list contains the dict; dict then gets an item.
        let p = b"]}q\x00ah\x00X\x01\x00\x00\x00kK\x01s0.";
        let pk = load(p).unwrap();
        let Some(Obj::List(l)) = pk.obj(&pk.root) else {
            panic!()
        };
        let Some(Obj::Dict(d)) = pk.obj(&l[0]) else {
            panic!()
        };
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn globals_are_inert_and_reduce_is_recorded() {
        let p = b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.";
        let pk = load(p).unwrap();
        let Some(Obj::Call { func, .. }) = pk.obj(&pk.root) else {
            panic!()
        };
        assert_eq!(pk.global(func), Some(("os", "system")));
    }

    #[test]
    fn memo_bomb_costs_one_index_per_fetch() {
        // t = (), then 200 times: t = (t, t). A deep-copying reader would need 2^200 nodes.
        let mut p = b"\x80\x02)q\x00".to_vec();
        for _ in 0..200 {
            p.extend_from_slice(b"h\x00h\x00\x86q\x00");
        }
        p.push(b'.');
        let pk = load(&p).unwrap();
        assert!(pk.arena.len() < 300);
    }

    #[test]
    fn declared_lengths_beyond_the_input_are_refused() {
        let e = load(b"\x80\x02X\xff\xff\xff\x7f").err().unwrap();
        assert!(e.0.contains("only 0 bytes remain"), "{e}");
    }

    #[test]
    fn big_ints_keep_their_bytes() {
        // The legacy format's magic number, 0x1950a86a20f9469cfc6c, is an 80-bit LONG1.
        let p = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.";
        let pk = load(p).unwrap();
        assert_eq!(
            pk.root,
            Value::BigInt(Rc::from(&b"l\xfc\x9cF\xf9 j\xa8P\x19"[..]))
        );
        assert_eq!(pk.consumed, p.len());
    }
}
