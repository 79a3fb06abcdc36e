//! A bounded unpickler for what `torch.save` writes in `data.pkl`.
//!
//! It is a stack machine over the opcodes of pickle protocols 0 to 5 that
//! never calls anything: globals are looked up in a fixed table of the names
//! a weights file uses (tensor rebuilders, storage types, `OrderedDict`,
//! dtypes), and "calling" one of them builds a plain description. Any other
//! global (`os.system`, a model class) is refused by name. Containers live
//! in an arena and values refer to them by index, so memo copies are cheap,
//! cycles are harmless and nothing recurses; the stack, the mark stack, the
//! memo and the arena all have fixed caps, and each opcode does work
//! proportional to the bytes it consumes (or to the items it moves off the
//! stack), so time and memory are linear in the pickle's size.

use safetensors::Dtype;
use std::collections::HashMap;
use std::rc::Rc;

/// Nesting of MARKs (open tuples, lists, dicts being built).
pub const MAX_MARKS: usize = 1024;
/// Values on the stack at once.
pub const MAX_STACK: usize = 1 << 20;
/// Memo entries (a state dict uses about eight per tensor).
pub const MAX_MEMO: usize = 1 << 21;
/// Containers and objects built (about seven per tensor).
pub const MAX_OBJECTS: usize = 1 << 21;
/// Items held by all containers together.
pub const MAX_ITEMS: usize = 1 << 23;
/// Dimensions of one tensor.
pub const MAX_DIMS: usize = 64;
/// Tensors of one state dict.
pub const MAX_TENSORS: usize = 1 << 20;
/// Length of a global's module or name.
const MAX_NAME: usize = 256;

/// The element type of a storage, from its pickled class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageKind {
    /// A type we copy: its safetensors dtype and element size in bytes.
    Known(Dtype, usize),
    /// A storage class we cannot represent (complex, quantized), by name.
    Unsupported(Rc<str>),
}

/// A storage as its persistent id describes it.
#[derive(Debug, Clone)]
pub struct Storage {
    pub kind: StorageKind,
    /// The archive key: the data lives in `<prefix>/data/<key>`.
    pub key: Rc<str>,
    /// Declared number of elements.
    pub numel: u64,
}

/// A strided view of a storage, as `_rebuild_tensor_v2` (or `_v3`)
/// receives it.
#[derive(Debug, Clone)]
pub struct View {
    pub storage: Storage,
    /// The tensor's element type: the storage's, or for `_v3` (which
    /// pairs an untyped storage with a dtype) the dtype's.
    pub kind: StorageKind,
    /// In elements.
    pub offset: u64,
    pub shape: Vec<u64>,
    /// In elements.
    pub stride: Vec<u64>,
}

/// One value of the state dict that is a tensor.
#[derive(Debug, Clone)]
pub enum Item {
    /// Shared: a hostile file may store one view under a million names.
    Tensor(Rc<View>),
    /// A tensor of a kind we cannot convert (quantized, sparse, nested...),
    /// named by the function that would rebuild it.
    Unsupported(Rc<str>),
}

#[derive(Debug, Clone, PartialEq)]
enum Global {
    RebuildTensor,
    RebuildTensorV3,
    RebuildParameter,
    RebuildFromType,
    UnsupportedTensor(Rc<str>),
    OrderedDict,
    Size,
    Storage(StorageKind),
    Dtype(StorageKind),
    /// A name that is harmless as data (a dtype, a device, a class used as
    /// a tag); "calling" it gives an opaque object.
    Inert,
}

#[derive(Debug, Clone)]
enum Value {
    None,
    Bool,
    Int(i64),
    /// An integer beyond i64 (only ever data).
    BigInt,
    Float,
    Str(Rc<str>),
    Bytes,
    Global(Global),
    Obj(usize),
}

#[derive(Debug, Default)]
struct Dict {
    items: Vec<(Value, Value)>,
    by_name: HashMap<Rc<str>, usize>,
}

#[derive(Debug)]
enum Obj {
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Dict),
    Set(Vec<Value>),
    Storage(Storage),
    Tensor(Rc<View>),
    Unsupported(Rc<str>),
    Opaque,
}

/// Reads `data` (a `data.pkl`) and returns the tensors of its state dict,
/// in order, with their names: the top-level dict's tensors, or if it has
/// none, those of its `state_dict` entry.
pub fn state_dict(data: &[u8]) -> Result<Vec<(String, Item)>, String> {
    let mut m = Machine::new(data);
    let top = m.run()?;
    m.tensors(top)
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    objs: Vec<Obj>,
    items: usize,
}

fn escape(s: &str) -> String {
    let mut out: String = s.chars().take(200).flat_map(char::escape_debug).collect();
    if s.chars().count() > 200 {
        out.push_str("...");
    }
    out
}

impl<'a> Machine<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            objs: Vec::new(),
            items: 0,
        }
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], String> {
        let n = usize::try_from(n).map_err(|_| self.truncated())?;
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or_else(|| self.truncated())?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn truncated(&self) -> String {
        format!(
            "data.pkl ends in the middle of an opcode at byte {} (truncated?)",
            self.pos
        )
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N as u64)?.try_into().expect("N bytes"))
    }

    /// A newline-terminated argument of the text opcodes.
    fn line(&mut self) -> Result<&'a [u8], String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.truncated())?;
        let s = &rest[..n];
        self.pos += n + 1;
        Ok(s)
    }

    fn push(&mut self, v: Value) -> Result<(), String> {
        if self.stack.len() >= MAX_STACK {
            return Err(format!("data.pkl stacks more than {MAX_STACK} values"));
        }
        self.stack.push(v);
        Ok(())
    }

    /// Pops one value; the values below the innermost MARK are out of reach.
    fn pop(&mut self) -> Result<Value, String> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(format!(
                "data.pkl pops from an empty stack at byte {}",
                self.pos
            ));
        }
        Ok(self.stack.pop().expect("above floor"))
    }

    fn top(&self) -> Result<&Value, String> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(format!("data.pkl uses an empty stack at byte {}", self.pos));
        }
        Ok(self.stack.last().expect("above floor"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| format!("data.pkl has no MARK to close at byte {}", self.pos))?;
        Ok(self.stack.split_off(mark))
    }

    fn count_items(&mut self, n: usize) -> Result<(), String> {
        self.items += n;
        if self.items > MAX_ITEMS {
            return Err(format!(
                "data.pkl builds more than {MAX_ITEMS} container items"
            ));
        }
        Ok(())
    }

    fn new_obj(&mut self, obj: Obj) -> Result<Value, String> {
        if self.objs.len() >= MAX_OBJECTS {
            return Err(format!("data.pkl builds more than {MAX_OBJECTS} objects"));
        }
        if let Obj::Tuple(v) | Obj::List(v) | Obj::Set(v) = &obj {
            self.count_items(v.len())?;
        }
        self.objs.push(obj);
        Ok(Value::Obj(self.objs.len() - 1))
    }

    fn memo_put(&mut self, key: u64) -> Result<(), String> {
        let v = self.top()?.clone();
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&key) {
            return Err(format!("data.pkl memoizes more than {MAX_MEMO} values"));
        }
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<(), String> {
        let v =
            self.memo.get(&key).cloned().ok_or_else(|| {
                format!("data.pkl reads memo entry {key}, which was never stored")
            })?;
        self.push(v)
    }

    fn text_int(&mut self) -> Result<u64, String> {
        let line = self.line()?;
        std::str::from_utf8(line)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| format!("data.pkl has a malformed memo key at byte {}", self.pos))
    }

    /// Runs to STOP; returns the result.
    fn run(&mut self) -> Result<Value, String> {
        loop {
            let at = self.pos;
            let op = self
                .byte()
                .map_err(|_| "data.pkl ends without a STOP opcode (truncated?)".to_string())?;
            match op {
                0x80 => {
                    let proto = self.byte()?;
                    if proto > 5 {
                        return Err(format!("data.pkl uses pickle protocol {proto}"));
                    }
                }
                0x95 => {
                    self.le::<8>()?; // FRAME: a length hint only
                }
                b'.' => {
                    let v = self.pop()?;
                    return Ok(v);
                }
                b'(' => {
                    if self.marks.len() >= MAX_MARKS {
                        return Err(format!("data.pkl nests deeper than {MAX_MARKS} levels"));
                    }
                    self.marks.push(self.stack.len());
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v)?;
                }
                // Numbers.
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool)?,
                0x89 => self.push(Value::Bool)?,
                b'J' => {
                    let v = i32::from_le_bytes(self.le()?);
                    self.push(Value::Int(v.into()))?
                }
                b'K' => {
                    let v = self.byte()?;
                    self.push(Value::Int(v.into()))?
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.le()?);
                    self.push(Value::Int(v.into()))?
                }
                0x8a => {
                    let n = self.byte()?;
                    let bytes = self.take(n.into())?;
                    self.push(long(bytes))?
                }
                0x8b => {
                    let n = i32::from_le_bytes(self.le()?);
                    let n = u64::try_from(n).map_err(|_| "data.pkl has a negative length")?;
                    let bytes = self.take(n)?;
                    self.push(long(bytes))?
                }
                b'I' | b'L' => {
                    let line = self.line()?;
                    let text = std::str::from_utf8(line).unwrap_or("").trim();
                    let v = match (op, text) {
                        (b'I', "01") => Value::Bool,
                        (b'I', "00") => Value::Bool,
                        _ => {
                            let digits = text.strip_suffix('L').unwrap_or(text);
                            let valid = !digits.is_empty()
                                && digits
                                    .strip_prefix(['-', '+'])
                                    .unwrap_or(digits)
                                    .bytes()
                                    .all(|b| b.is_ascii_digit());
                            if !valid {
                                return Err(format!(
                                    "data.pkl has a malformed integer at byte {at}"
                                ));
                            }
                            digits.parse().map(Value::Int).unwrap_or(Value::BigInt)
                        }
                    };
                    self.push(v)?
                }
                b'G' => {
                    self.le::<8>()?;
                    self.push(Value::Float)?
                }
                b'F' => {
                    self.line()?;
                    self.push(Value::Float)?
                }
                // Text and bytes.
                b'X' => {
                    let n = u32::from_le_bytes(self.le()?);
                    let s = self.take(n.into())?;
                    self.push(utf8(s, at)?)?
                }
                0x8c => {
                    let n = self.byte()?;
                    let s = self.take(n.into())?;
                    self.push(utf8(s, at)?)?
                }
                0x8d => {
                    let n = u64::from_le_bytes(self.le()?);
                    let s = self.take(n)?;
                    self.push(utf8(s, at)?)?
                }
                b'T' => {
                    let n = i32::from_le_bytes(self.le()?);
                    let n = u64::try_from(n).map_err(|_| "data.pkl has a negative length")?;
                    let s = self.take(n)?;
                    self.push(latin1(s))?
                }
                b'U' => {
                    let n = self.byte()?;
                    let s = self.take(n.into())?;
                    self.push(latin1(s))?
                }
                b'S' => {
                    let line = self.line()?;
                    let v = quoted(line)
                        .ok_or_else(|| format!("data.pkl has a malformed string at byte {at}"))?;
                    self.push(v)?
                }
                b'V' => {
                    let line = self.line()?;
                    self.push(raw_unicode(line))?
                }
                b'B' => {
                    let n = u32::from_le_bytes(self.le()?);
                    self.take(n.into())?;
                    self.push(Value::Bytes)?
                }
                b'C' => {
                    let n = self.byte()?;
                    self.take(n.into())?;
                    self.push(Value::Bytes)?
                }
                0x8e | 0x96 => {
                    let n = u64::from_le_bytes(self.le()?);
                    self.take(n)?;
                    self.push(Value::Bytes)?
                }
                // Containers.
                b')' => {
                    let v = self.new_obj(Obj::Tuple(Vec::new()))?;
                    self.push(v)?
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let v = self.new_obj(Obj::Tuple(items))?;
                    self.push(v)?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    let v = self.new_obj(Obj::Tuple(items))?;
                    self.push(v)?
                }
                b']' => {
                    let v = self.new_obj(Obj::List(Vec::new()))?;
                    self.push(v)?
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let v = self.new_obj(Obj::List(items))?;
                    self.push(v)?
                }
                b'a' => {
                    let item = self.pop()?;
                    self.extend(vec![item])?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.extend(items)?
                }
                b'}' => {
                    let v = self.new_obj(Obj::Dict(Dict::default()))?;
                    self.push(v)?
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let v = self.new_obj(Obj::Dict(Dict::default()))?;
                    self.push(v)?;
                    self.set_items(items)?
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.set_items(vec![key, value])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?
                }
                0x8f => {
                    let v = self.new_obj(Obj::Set(Vec::new()))?;
                    self.push(v)?
                }
                0x90 => {
                    let items = self.pop_mark()?;
                    self.extend(items)?
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    let v = self.new_obj(Obj::Set(items))?;
                    self.push(v)?
                }
                // Memo.
                b'q' => {
                    let k = self.byte()?;
                    self.memo_put(k.into())?
                }
                b'r' => {
                    let k = u32::from_le_bytes(self.le()?);
                    self.memo_put(k.into())?
                }
                b'p' => {
                    let k = self.text_int()?;
                    self.memo_put(k)?
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k)?
                }
                b'h' => {
                    let k = self.byte()?;
                    self.memo_get(k.into())?
                }
                b'j' => {
                    let k = u32::from_le_bytes(self.le()?);
                    self.memo_get(k.into())?
                }
                b'g' => {
                    let k = self.text_int()?;
                    self.memo_get(k)?
                }
                // Names, calls and objects.
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = global(module, name)?;
                    self.push(Value::Global(g))?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return Err(format!(
                            "data.pkl names a global by non-strings at byte {at}"
                        ));
                    };
                    let g = global(module.as_bytes(), name.as_bytes())?;
                    self.push(Value::Global(g))?
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.call(func, args, true)?;
                    self.push(v)?
                }
                0x81 => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.instantiate(cls, args)?;
                    self.push(v)?
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.instantiate(cls, args)?;
                    self.push(v)?
                }
                b'b' => {
                    // BUILD sets an object's state (a state dict's
                    // `_metadata`, a parameter's attributes): kept out.
                    self.pop()?;
                    self.top()?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent(pid)?;
                    self.push(v)?
                }
                b'P' | b'i' | b'o' | 0x82..=0x84 | 0x97 | 0x98 => {
                    return Err(format!(
                        "data.pkl uses opcode 0x{op:02x} at byte {at}, which PyTorch weights \
                         files do not use"
                    ));
                }
                _ => {
                    return Err(format!(
                        "data.pkl has an unknown opcode 0x{op:02x} at byte {at} (not a pickle?)"
                    ))
                }
            }
        }
    }

    /// APPEND, APPENDS, ADDITEMS: onto the list or set below.
    fn extend(&mut self, items: Vec<Value>) -> Result<(), String> {
        let n = items.len();
        let Value::Obj(i) = self.top()?.clone() else {
            return Err(format!(
                "data.pkl appends to a non-list at byte {}",
                self.pos
            ));
        };
        self.count_items(n)?;
        match &mut self.objs[i] {
            Obj::List(v) | Obj::Set(v) => v.extend(items),
            _ => {
                return Err(format!(
                    "data.pkl appends to a non-list at byte {}",
                    self.pos
                ))
            }
        }
        Ok(())
    }

    /// SETITEM, SETITEMS, DICT: key-value pairs into the dict below.
    fn set_items(&mut self, items: Vec<Value>) -> Result<(), String> {
        if !items.len().is_multiple_of(2) {
            return Err(format!(
                "data.pkl sets dict items from an odd number of values at byte {}",
                self.pos
            ));
        }
        let n = items.len() / 2;
        let Value::Obj(i) = self.top()?.clone() else {
            return Err(format!(
                "data.pkl sets items of a non-dict at byte {}",
                self.pos
            ));
        };
        self.count_items(n)?;
        let Obj::Dict(d) = &mut self.objs[i] else {
            return Err(format!(
                "data.pkl sets items of a non-dict at byte {}",
                self.pos
            ));
        };
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            match &k {
                Value::Str(name) => match d.by_name.get(name) {
                    Some(&at) => d.items[at].1 = v,
                    None => {
                        d.by_name.insert(name.clone(), d.items.len());
                        d.items.push((k, v));
                    }
                },
                _ => d.items.push((k, v)),
            }
        }
        Ok(())
    }

    fn tuple(&self, v: &Value) -> Option<&[Value]> {
        match v {
            Value::Obj(i) => match &self.objs[*i] {
                Obj::Tuple(items) => Some(items),
                _ => None,
            },
            _ => None,
        }
    }

    /// REDUCE: what calling `func(*args)` would build, without calling it.
    fn call(&mut self, func: Value, args: Value, nested_ok: bool) -> Result<Value, String> {
        let at = self.pos;
        let Value::Global(g) = func else {
            return Err(format!("data.pkl calls a non-function at byte {at}"));
        };
        // Only the first few arguments matter; a long tuple is not copied
        // (a memoized one could be passed to many calls).
        let args: Vec<Value> = self
            .tuple(&args)
            .ok_or_else(|| {
                format!("data.pkl calls a function without an argument tuple at byte {at}")
            })?
            .iter()
            .take(7)
            .cloned()
            .collect();
        match g {
            Global::RebuildTensor | Global::RebuildTensorV3 => {
                let bad =
                    |what: &str| format!("data.pkl rebuilds a tensor with {what} at byte {at}");
                let v3 = g == Global::RebuildTensorV3;
                if args.len() < if v3 { 7 } else { 4 } {
                    return Err(bad("too few arguments"));
                }
                let storage = match &args[0] {
                    Value::Obj(i) => match &self.objs[*i] {
                        Obj::Storage(s) => s.clone(),
                        _ => return Err(bad("no storage")),
                    },
                    _ => return Err(bad("no storage")),
                };
                let offset = nonneg(&args[1]).ok_or_else(|| bad("a bad storage offset"))?;
                let dims = |v: &Value| -> Option<Vec<u64>> {
                    let t = self.tuple(v)?;
                    if t.len() > MAX_DIMS {
                        return None;
                    }
                    t.iter().map(nonneg).collect()
                };
                let shape = dims(&args[2]).ok_or_else(|| bad("a bad size"))?;
                let stride = dims(&args[3]).ok_or_else(|| bad("a bad stride"))?;
                if shape.len() != stride.len() {
                    return Err(bad("size and stride of different lengths"));
                }
                let kind = if v3 {
                    match &args[6] {
                        Value::Global(Global::Dtype(kind)) => kind.clone(),
                        _ => return Err(bad("no dtype")),
                    }
                } else {
                    storage.kind.clone()
                };
                self.new_obj(Obj::Tensor(Rc::new(View {
                    storage,
                    kind,
                    offset,
                    shape,
                    stride,
                })))
            }
            Global::RebuildParameter => {
                // (data, requires_grad, backward_hooks[, state]): the data.
                match args.first() {
                    Some(v @ Value::Obj(i))
                        if matches!(self.objs[*i], Obj::Tensor(_) | Obj::Unsupported(_)) =>
                    {
                        Ok(v.clone())
                    }
                    _ => Err(format!(
                        "data.pkl rebuilds a parameter from a non-tensor at byte {at}"
                    )),
                }
            }
            Global::RebuildFromType if nested_ok => {
                // (func, new_type, args, state): func(*args).
                if args.len() < 3 {
                    return Err(format!(
                        "data.pkl rebuilds a tensor subclass with too few arguments at byte {at}"
                    ));
                }
                self.call(args[0].clone(), args[2].clone(), false)
            }
            Global::UnsupportedTensor(name) => self.new_obj(Obj::Unsupported(name)),
            Global::OrderedDict if args.is_empty() => self.new_obj(Obj::Dict(Dict::default())),
            Global::Size => match args.first() {
                Some(v) if self.tuple(v).is_some() => Ok(v.clone()),
                _ => Err(format!(
                    "data.pkl builds a torch.Size from a non-tuple at byte {at}"
                )),
            },
            Global::Inert => self.new_obj(Obj::Opaque),
            other => Err(format!(
                "data.pkl calls {other:?} in a way PyTorch never writes, at byte {at}"
            )),
        }
    }

    /// NEWOBJ, NEWOBJ_EX: `cls.__new__(cls, *args)`.
    fn instantiate(&mut self, cls: Value, args: Value) -> Result<Value, String> {
        if self.tuple(&args).is_none() {
            return Err(format!(
                "data.pkl creates an object without an argument tuple at byte {}",
                self.pos
            ));
        }
        match cls {
            Value::Global(Global::OrderedDict) => self.new_obj(Obj::Dict(Dict::default())),
            Value::Global(Global::Inert) => self.new_obj(Obj::Opaque),
            _ => Err(format!(
                "data.pkl creates an object of a class PyTorch weights never hold, at byte {}",
                self.pos
            )),
        }
    }

    /// BINPERSID: `('storage', StorageType, key, location, numel)`.
    fn persistent(&mut self, pid: Value) -> Result<Value, String> {
        let at = self.pos;
        let bad =
            || format!("data.pkl has a persistent id that is not a tensor storage at byte {at}");
        let t = self.tuple(&pid).ok_or_else(bad)?;
        let [Value::Str(tag), Value::Global(Global::Storage(kind)), key, _location, numel] = t
        else {
            return Err(bad());
        };
        if &**tag != "storage" {
            return Err(bad());
        }
        let key: Rc<str> = match key {
            Value::Str(s) if s.len() <= MAX_NAME => s.clone(),
            Value::Int(i) => i.to_string().into(),
            _ => return Err(bad()),
        };
        let numel = nonneg(numel).ok_or_else(bad)?;
        let storage = Storage {
            kind: kind.clone(),
            key,
            numel,
        };
        self.new_obj(Obj::Storage(storage))
    }

    /// The tensors of the state dict `top`.
    fn tensors(&self, top: Value) -> Result<Vec<(String, Item)>, String> {
        let dict = |v: &Value| match v {
            Value::Obj(i) => match &self.objs[*i] {
                Obj::Dict(d) => Some(d),
                _ => None,
            },
            _ => None,
        };
        let item = |v: &Value| match v {
            Value::Obj(i) => match &self.objs[*i] {
                Obj::Tensor(view) => Some(Item::Tensor(view.clone())),
                Obj::Unsupported(name) => Some(Item::Unsupported(name.clone())),
                _ => None,
            },
            _ => None,
        };
        let top = dict(&top).ok_or("data.pkl holds no state dict (no dict at its top)")?;
        let mut d = top;
        if !top.items.iter().any(|(_, v)| item(v).is_some()) {
            // Training checkpoints nest the weights under "state_dict".
            if let Some(&i) = top.by_name.get("state_dict") {
                if let Some(inner) = dict(&top.items[i].1) {
                    d = inner;
                }
            }
        }
        let mut out = Vec::new();
        let mut seen = vec![false; self.objs.len()];
        for (k, v) in &d.items {
            match (k, item(v)) {
                (Value::Str(name), Some(item)) => {
                    if out.len() == MAX_TENSORS {
                        return Err(format!(
                            "data.pkl's state dict holds more than {MAX_TENSORS} tensors"
                        ));
                    }
                    out.push((name.to_string(), item))
                }
                (_, Some(_)) => {
                    return Err("data.pkl stores a tensor under a key that is not a string".into())
                }
                (k, None) => {
                    if self.holds_tensor(v, &mut seen) {
                        let name = match k {
                            Value::Str(s) => format!("'{}'", escape(s)),
                            _ => "a non-string key".into(),
                        };
                        return Err(format!(
                            "data.pkl nests tensors in a container under {name}; only flat \
                             state dicts (name -> tensor) are read"
                        ));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Whether any tensor is reachable from `v` through objects not `seen`
    /// before (each object is visited once over all calls).
    fn holds_tensor(&self, v: &Value, seen: &mut [bool]) -> bool {
        let mut todo = vec![v.clone()];
        while let Some(v) = todo.pop() {
            let Value::Obj(i) = v else { continue };
            if std::mem::replace(&mut seen[i], true) {
                continue;
            }
            match &self.objs[i] {
                Obj::Tensor(_) | Obj::Unsupported(_) => return true,
                Obj::Tuple(items) | Obj::List(items) | Obj::Set(items) => {
                    todo.extend(items.iter().cloned())
                }
                Obj::Dict(d) => todo.extend(d.items.iter().map(|(_, v)| v.clone())),
                Obj::Storage(_) | Obj::Opaque => {}
            }
        }
        false
    }
}

fn nonneg(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        _ => None,
    }
}

/// LONG1/LONG4: little-endian two's complement.
fn long(bytes: &[u8]) -> Value {
    if bytes.len() > 8 {
        let sign = if bytes[bytes.len() - 1] & 0x80 != 0 {
            0xFF
        } else {
            0
        };
        if bytes[8..].iter().any(|&b| b != sign) || (bytes[7] & 0x80 != 0) != (sign != 0) {
            return Value::BigInt;
        }
    }
    let mut buf = if bytes.last().is_some_and(|&b| b & 0x80 != 0) {
        [0xFF; 8]
    } else {
        [0; 8]
    };
    let n = bytes.len().min(8);
    buf[..n].copy_from_slice(&bytes[..n]);
    Value::Int(i64::from_le_bytes(buf))
}

fn utf8(s: &[u8], at: usize) -> Result<Value, String> {
    std::str::from_utf8(s)
        .map(|s| Value::Str(s.into()))
        .map_err(|_| format!("data.pkl has a string that is not UTF-8 at byte {at}"))
}

fn latin1(s: &[u8]) -> Value {
    Value::Str(s.iter().map(|&b| b as char).collect::<String>().into())
}

/// STRING: a quoted Python 2 `repr` of a byte string.
fn quoted(line: &[u8]) -> Option<Value> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let q = *line.first()?;
    if !(q == b'\'' || q == b'"') || line.len() < 2 || line[line.len() - 1] != q {
        return None;
    }
    let body = &line[1..line.len() - 1];
    let mut out = String::with_capacity(body.len());
    let mut it = body.iter().copied();
    while let Some(b) = it.next() {
        if b != b'\\' {
            out.push(b as char);
            continue;
        }
        match it.next()? {
            b'n' => out.push('\n'),
            b't' => out.push('\t'),
            b'r' => out.push('\r'),
            b'0' => out.push('\0'),
            b'x' => {
                let hex = [it.next()?, it.next()?];
                let v = u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?;
                out.push(v as char);
            }
            other => out.push(other as char),
        }
    }
    Some(Value::Str(out.into()))
}

/// UNICODE: raw-unicode-escape text (only `\uXXXX` and `\UXXXXXXXX` are
/// escapes).
fn raw_unicode(line: &[u8]) -> Value {
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while i < line.len() {
        let b = line[i];
        let width = match (b, line.get(i + 1)) {
            (b'\\', Some(b'u')) => 4,
            (b'\\', Some(b'U')) => 8,
            _ => 0,
        };
        let code = line
            .get(i + 2..i + 2 + width)
            .filter(|_| width > 0)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .and_then(char::from_u32);
        match code {
            Some(c) => {
                out.push(c);
                i += 2 + width;
            }
            None => {
                out.push(b as char);
                i += 1;
            }
        }
    }
    Value::Str(out.into())
}

/// The storage classes PyTorch pickles, by name.
fn storage_kind(name: &str) -> Option<StorageKind> {
    use StorageKind::Known;
    Some(match name {
        "FloatStorage" => Known(Dtype::F32, 4),
        "DoubleStorage" => Known(Dtype::F64, 8),
        "HalfStorage" => Known(Dtype::F16, 2),
        "BFloat16Storage" => Known(Dtype::BF16, 2),
        "LongStorage" => Known(Dtype::I64, 8),
        "IntStorage" => Known(Dtype::I32, 4),
        "ShortStorage" => Known(Dtype::I16, 2),
        "CharStorage" => Known(Dtype::I8, 1),
        "ByteStorage" | "UntypedStorage" => Known(Dtype::U8, 1),
        "BoolStorage" => Known(Dtype::BOOL, 1),
        _ if name.ends_with("Storage") => StorageKind::Unsupported(name.into()),
        _ => return None,
    })
}

/// The `torch` dtypes, as `_rebuild_tensor_v3` names them.
fn dtype_kind(name: &str) -> Option<StorageKind> {
    use StorageKind::Known;
    Some(match name {
        "float32" | "float" => Known(Dtype::F32, 4),
        "float64" | "double" => Known(Dtype::F64, 8),
        "float16" | "half" => Known(Dtype::F16, 2),
        "bfloat16" => Known(Dtype::BF16, 2),
        "int64" | "long" => Known(Dtype::I64, 8),
        "int32" | "int" => Known(Dtype::I32, 4),
        "int16" | "short" => Known(Dtype::I16, 2),
        "int8" => Known(Dtype::I8, 1),
        "uint8" => Known(Dtype::U8, 1),
        "bool" => Known(Dtype::BOOL, 1),
        "uint16" => Known(Dtype::U16, 2),
        "uint32" => Known(Dtype::U32, 4),
        "uint64" => Known(Dtype::U64, 8),
        "float8_e4m3fn" => Known(Dtype::F8_E4M3, 1),
        "float8_e5m2" => Known(Dtype::F8_E5M2, 1),
        "float8_e8m0fnu" => Known(Dtype::F8_E8M0, 1),
        "float8_e4m3fnuz" => Known(Dtype::F8_E4M3FNUZ, 1),
        "float8_e5m2fnuz" => Known(Dtype::F8_E5M2FNUZ, 1),
        "complex32" | "chalf" | "complex64" | "cfloat" | "complex128" | "cdouble"
        | "bcomplex32" | "float4_e2m1fn_x2" | "bits8" | "bits16" | "bits1x8" | "bits2x4"
        | "bits4x2" | "qint8" | "quint8" | "qint32" | "quint4x2" | "quint2x4" => {
            StorageKind::Unsupported(format!("torch.{name}").into())
        }
        _ => return None,
    })
}

/// Other `torch` names that may appear as data (inert).
const TORCH_DATA: &[&str] = &[
    "device",
    "Tensor",
    "strided",
    "sparse_coo",
    "contiguous_format",
    "channels_last",
    "preserve_format",
];

/// Looks a GLOBAL up in the table of names a weights file uses.
fn global(module: &[u8], name: &[u8]) -> Result<Global, String> {
    if module.len() > MAX_NAME || name.len() > MAX_NAME {
        return Err("data.pkl names a global with an overlong name".into());
    }
    let module = String::from_utf8_lossy(module);
    let name = String::from_utf8_lossy(name);
    let module = module.trim_end_matches('\r');
    let name = name.trim_end_matches('\r');
    Ok(match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_tensor_v3") => Global::RebuildTensorV3,
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            Global::RebuildParameter
        }
        ("torch._tensor", "_rebuild_from_type_v2") => Global::RebuildFromType,
        (
            "torch._utils",
            "_rebuild_qtensor"
            | "_rebuild_sparse_tensor"
            | "_rebuild_nested_tensor"
            | "_rebuild_meta_tensor_no_storage"
            | "_rebuild_wrapper_subclass"
            | "_rebuild_device_tensor_from_numpy"
            | "_rebuild_xla_tensor"
            | "_rebuild_mtia_tensor",
        ) => Global::UnsupportedTensor(format!("{module}.{name}").into()),
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch", "Size") => Global::Size,
        ("torch" | "torch.storage", "UntypedStorage") => {
            Global::Storage(StorageKind::Known(Dtype::U8, 1))
        }
        ("torch", n) if storage_kind(n).is_some() => {
            Global::Storage(storage_kind(n).expect("checked"))
        }
        ("torch", n) if dtype_kind(n).is_some() => Global::Dtype(dtype_kind(n).expect("checked")),
        ("torch", n) if TORCH_DATA.contains(&n) => Global::Inert,
        ("torch.nn.parameter", "Parameter") => Global::Inert,
        _ => {
            return Err(format!(
                "data.pkl names the global {}.{}, which a PyTorch weights file never needs; \
                 refusing to read it (nothing from the file is ever run)",
                escape(module),
                escape(name)
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pickle: &[u8]) -> Result<Vec<(String, Item)>, String> {
        state_dict(pickle)
    }

    fn err(pickle: &[u8]) -> String {
        run(pickle).expect_err("refused")
    }

    /// `{name: _rebuild_tensor_v2(('storage', FloatStorage, '0', 'cpu', 6),
    /// 0, (2, 3), (3, 1), False, ())}`.
    fn one_tensor(name: &str) -> Vec<u8> {
        let mut p = b"\x80\x02}(".to_vec();
        p.push(0x8c);
        p.push(name.len() as u8);
        p.extend(name.as_bytes());
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storage");
        p.extend(b"ctorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQ");
        p.extend(b"K\x00K\x02K\x03\x86K\x03K\x01\x86\x89)tRu.");
        p
    }

    #[test]
    fn a_plain_state_dict_is_read() {
        let got = run(&one_tensor("w")).unwrap();
        assert_eq!(got.len(), 1);
        let Item::Tensor(v) = &got[0].1 else {
            panic!("not a tensor")
        };
        assert_eq!(got[0].0, "w");
        assert_eq!(v.kind, StorageKind::Known(Dtype::F32, 4));
        assert_eq!(
            (v.offset, &v.shape[..], &v.stride[..]),
            (0, &[2, 3][..], &[3, 1][..])
        );
        assert_eq!((&*v.storage.key, v.storage.numel), ("0", 6));
    }

    #[test]
    fn globals_outside_the_table_are_refused_by_name() {
        assert!(err(b"\x80\x02cos\nsystem\n.").contains("os.system"));
        let stack_global = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.";
        assert!(err(stack_global).contains("builtins.eval"));
        // A known name called in a way torch never writes.
        assert!(err(b"\x80\x02ctorch\nFloatStorage\n)R.").contains("never writes"));
    }

    #[test]
    fn every_cap_holds() {
        let mut marks = b"\x80\x02".to_vec();
        marks.extend(vec![b'('; MAX_MARKS + 1]);
        assert!(err(&marks).contains("nests deeper"));
        let mut stack = b"\x80\x02".to_vec();
        stack.extend(vec![b'N'; MAX_STACK + 1]);
        assert!(err(&stack).contains("stacks more than"));
        // Objects: empty tuples, popped at once so the stack stays small.
        let mut objects = b"\x80\x02".to_vec();
        for _ in 0..=MAX_OBJECTS {
            objects.extend(b")0");
        }
        assert!(err(&objects).contains("objects"));
        // Items: a list extended by the same 2^20 values again and again.
        let mut items = b"\x80\x02]".to_vec();
        for _ in 0..=(MAX_ITEMS >> 19) {
            items.push(b'(');
            items.extend(vec![b'N'; 1 << 19]);
            items.push(b'e');
        }
        assert!(err(&items).contains("container items"));
        // Memo: MEMOIZE after each value.
        let mut memo = b"\x80\x04".to_vec();
        for _ in 0..=MAX_MEMO {
            memo.extend(b"N\x940");
        }
        assert!(err(&memo).contains("memoizes more than"));
    }

    #[test]
    fn one_view_under_many_names_is_shared_and_capped() {
        // {k0: tensor, k1: <memo 0>, k2: <memo 0>, ...}, in batches of
        // SETITEMS so the stack stays small.
        let dict = |names: usize| {
            let tensor = one_tensor("k");
            // one_tensor's value: after PROTO, EMPTY_DICT, MARK and the key.
            let value = &tensor[4 + 1 + 1 + 1..tensor.len() - 2];
            let mut p = b"\x80\x02}".to_vec();
            for batch in 0..names.div_ceil(1000) {
                p.push(b'(');
                for k in batch * 1000..(batch * 1000 + 1000).min(names) {
                    let key = format!("k{k:07}");
                    p.push(b'X');
                    p.extend((key.len() as u32).to_le_bytes());
                    p.extend(key.as_bytes());
                    if k == 0 {
                        p.extend(value);
                        p.extend(b"q\x00");
                    } else {
                        p.extend(b"h\x00");
                    }
                }
                p.push(b'u');
            }
            p.push(b'.');
            p
        };
        let got = run(&dict(3)).unwrap();
        let views: Vec<&Rc<View>> = got
            .iter()
            .map(|(_, item)| match item {
                Item::Tensor(v) => v,
                Item::Unsupported(_) => panic!("not a tensor"),
            })
            .collect();
        assert_eq!(views.len(), 3);
        assert!(views.iter().all(|v| Rc::ptr_eq(v, views[0])));
        assert!(err(&dict(MAX_TENSORS + 1)).contains("more than 1048576 tensors"));
    }

    #[test]
    fn malformed_streams_are_refused_not_panicked_on() {
        for (pickle, needle) in [
            (&b""[..], "without a STOP"),
            (b"\x80\x02X\xff\xff\xff\xff", "ends in the middle"),
            (b"\x80\x020", "empty stack"),
            (b"\x80\x02N(0", "empty stack"),
            (b"\x80\x021", "no MARK"),
            (b"\x80\x02h\x05", "never stored"),
            (b"\x80\x02NNa", "non-list"),
            (b"\x80\x02}N\x85s", "empty stack"),
            (b"\x80\x09", "protocol 9"),
            (b"\xfe", "unknown opcode 0xfe"),
            (b"\x80\x02\x82\x01", "opcode 0x82"),
            (b"\x80\x02NN.", "no state dict"),
        ] {
            let e = err(pickle);
            assert!(e.contains(needle), "{pickle:?}: {e}");
        }
    }

    #[test]
    fn long_integers_decode_as_twos_complement() {
        let int = |b: &[u8]| match long(b) {
            Value::Int(i) => Some(i),
            _ => None,
        };
        assert_eq!(int(&[]), Some(0));
        assert_eq!(int(&[0xff]), Some(-1));
        assert_eq!(int(&[0x00, 0x80]), Some(-32768));
        assert_eq!(int(&[0x00, 0x80, 0x00]), Some(32768));
        assert_eq!(int(&[0xff; 9]), Some(-1));
        assert_eq!(int(&[0, 0, 0, 0, 0, 0, 0, 0x80, 0]), None);
        assert_eq!(int(&[0, 0, 0, 0, 0, 0, 0, 0, 1]), None);
    }

    #[test]
    fn a_repeated_key_keeps_its_last_value() {
        // {"w": None} then SETITEMS "w": tensor (one_tensor's opcodes
        // after its own PROTO and EMPTY_DICT): the tensor, once.
        let mut p = b"\x80\x02}X\x01\x00\x00\x00wNs".to_vec();
        p.extend(&one_tensor("w")[3..]);
        let got = run(&p).unwrap();
        assert_eq!(got.len(), 1);
    }
}
