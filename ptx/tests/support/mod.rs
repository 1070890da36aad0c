//! A PTX interpreter for the instructions the fixtures use, so the tests can run a kernel over a
//! whole grid and over its slices and compare the memory bit for bit, with no GPU. It runs one
//! block at a time, its threads in turn up to each `bar.sync`; anything it does not know panics
//! with the instruction, so a fixture can never silently run wrong.

use gpuslice_ptx::lex::{Kind, Token};
use gpuslice_ptx::params::layout;
use gpuslice_ptx::syntax::{signature, Item, Module, Scope};
use gpuslice_ptx::Dim3;
use std::collections::HashMap;

/// One decoded instruction (or a label, or a `.param` declaration of a call sequence).
#[derive(Clone, Debug)]
enum Line {
    Label(String),
    /// A call sequence's `.param`: name and size.
    ParamDecl(String, usize),
    Inst {
        guard: Option<(bool, String)>,
        op: String,
        args: Vec<Vec<Token>>,
    },
}

#[derive(Clone)]
struct Function {
    params: Vec<String>,
    ret: Option<String>,
    lines: Vec<Line>,
    labels: HashMap<String, usize>,
    /// Shared variables declared in the body: name, size, alignment.
    shared: Vec<(String, u64, u64)>,
}

fn flatten(items: &[Item], out: &mut Vec<Line>, shared: &mut Vec<(String, u64, u64)>) {
    for item in items {
        match item {
            Item::Label(name, _) => out.push(Line::Label(name.text.clone())),
            Item::Scope(s) => flatten(&s.items, out, shared),
            Item::Stmt(t) if t[0].is(".param") => {
                let p = layout(&t[..t.len() - 1]).unwrap().remove(0);
                out.push(Line::ParamDecl(p.name, p.size as usize));
            }
            Item::Stmt(t) if t[0].is(".shared") => shared.push(shared_decl(t)),
            Item::Stmt(t) if t[0].text.starts_with('.') => {}
            Item::Stmt(t) => out.push(decode(t)),
        }
    }
}

/// `.shared .align A .b8 name[N];` (the form nvcc gives every shared variable).
fn shared_decl(t: &[Token]) -> (String, u64, u64) {
    let align = t.iter().position(|x| x.is(".align")).map_or(1, |i| t[i + 1].text.parse().unwrap());
    let open = t.iter().position(|x| x.is("[")).expect("shared array");
    let size = t[open + 1].text.parse().unwrap_or(0);
    (t[open - 1].text.clone(), size, align)
}

fn decode(t: &[Token]) -> Line {
    let (guard, rest) = if t[0].is("@") {
        let neg = t[1].is("!");
        let reg = if neg { &t[2] } else { &t[1] };
        (Some((neg, reg.text.clone())), &t[if neg { 3 } else { 2 }..])
    } else {
        (None, t)
    };
    let op = rest[0].text.clone();
    let mut args = vec![Vec::new()];
    let mut depth = 0;
    for tok in &rest[1..rest.len() - 1] {
        match tok.text.as_str() {
            "(" | "[" | "{" => depth += 1,
            ")" | "]" | "}" => depth -= 1,
            "," if depth == 0 => {
                args.push(Vec::new());
                continue;
            }
            _ => {}
        }
        args.last_mut().unwrap().push(tok.clone());
    }
    args.retain(|a| !a.is_empty());
    Line::Inst { guard, op, args }
}

fn function(scope: &Scope) -> (String, Function) {
    let sig = signature(&scope.header).unwrap();
    let list = &scope.header[sig.params_open + 1..sig.params_close];
    let params = layout(list).unwrap().into_iter().map(|p| p.name).collect();
    let ret = scope.header[..sig.params_open].iter().rev().find(|t| t.text.starts_with("func_retval")).map(|t| t.text.clone());
    let (mut lines, mut shared) = (Vec::new(), Vec::new());
    flatten(&scope.items, &mut lines, &mut shared);
    let labels = lines.iter().enumerate().filter_map(|(i, l)| if let Line::Label(n) = l { Some((n.clone(), i)) } else { None }).collect();
    (sig.name, Function { params, ret, lines, labels, shared })
}

pub struct Program {
    funcs: HashMap<String, Function>,
    /// Module-scope shared variables, and the dynamic (`.extern .shared`) one.
    shared: Vec<(String, u64, u64)>,
    dynamic: Option<String>,
}

impl Program {
    pub fn load(ptx: &str) -> Program {
        let m = Module::parse(ptx).unwrap();
        let mut funcs = HashMap::new();
        let (mut shared, mut dynamic) = (Vec::new(), None);
        for item in &m.items {
            match item {
                Item::Scope(s) if signature(&s.header).is_some() => {
                    let (n, f) = function(s);
                    funcs.insert(n, f);
                }
                Item::Stmt(t) if t[0].is(".extern") && t[1].is(".shared") => dynamic = Some(t[t.len() - 4].text.clone()),
                Item::Stmt(t) if t[0].is(".shared") => shared.push(shared_decl(t)),
                _ => {}
            }
        }
        Program { funcs, shared, dynamic }
    }
}

/// Device memory: one flat byte array; addresses are offsets into it.
pub struct Memory(pub Vec<u8>);

impl Memory {
    pub fn read(&self, addr: u64, n: usize) -> u64 {
        let a = addr as usize;
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(&self.0[a..a + n]);
        u64::from_le_bytes(b)
    }
    pub fn write(&mut self, addr: u64, n: usize, v: u64) {
        let a = addr as usize;
        self.0[a..a + n].copy_from_slice(&v.to_le_bytes()[..n]);
    }
}

struct Frame<'p> {
    f: &'p Function,
    pc: usize,
    regs: HashMap<String, u64>,
    /// The parameter space this frame sees: its own parameters and its call sequences' `.param`s.
    params: HashMap<String, Vec<u8>>,
}

struct Ctx {
    tid: [u64; 3],
    ntid: [u64; 3],
    ctaid: [u64; 3],
    nctaid: [u64; 3],
}

fn width(op: &str) -> usize {
    let ty = op.rsplit('.').next().unwrap();
    match &ty[1..] {
        "8" => 1,
        "16" => 2,
        "32" => 4,
        "64" => 8,
        _ => panic!("no width in {op}"),
    }
}

fn mask(v: u64, bytes: usize) -> u64 {
    if bytes >= 8 {
        v
    } else {
        v & ((1u64 << (8 * bytes)) - 1)
    }
}

fn signed(v: u64, bytes: usize) -> i64 {
    let shift = 64 - 8 * bytes as u32;
    ((v << shift) as i64) >> shift
}

enum Stop {
    Barrier,
    Done,
}

struct Block<'a> {
    prog: &'a Program,
    global: &'a mut Memory,
    shared: Memory,
    symbols: HashMap<String, u64>,
}

impl<'a> Block<'a> {
    fn value(&self, frame: &Frame, ctx: &Ctx, arg: &[Token]) -> u64 {
        let t = &arg[0];
        if t.is("-") {
            return self.value(frame, ctx, &arg[1..]).wrapping_neg();
        }
        if let Some(v) = frame.regs.get(&t.text) {
            return *v;
        }
        if let Some((base, c)) = t.text.split_once('.') {
            let axis = ["x", "y", "z"].iter().position(|a| *a == c);
            if let (Some(axis), true) = (axis, base.starts_with('%')) {
                return match base {
                    "%tid" => ctx.tid[axis],
                    "%ntid" => ctx.ntid[axis],
                    "%ctaid" => ctx.ctaid[axis],
                    "%nctaid" => ctx.nctaid[axis],
                    _ => panic!("special register {}", t.text),
                };
            }
        }
        if let Some(a) = self.symbols.get(&t.text) {
            return *a;
        }
        if let Some(hex) = t.text.strip_prefix("0x") {
            return u64::from_str_radix(hex, 16).unwrap();
        }
        t.text.parse::<u64>().unwrap_or_else(|_| if t.text.starts_with('%') { 0 } else { panic!("operand {:?}", t.text) })
    }

    /// `[reg]`, `[reg+n]`, `[name]`, `[name+n]`: the base (register value, shared symbol address, or
    /// parameter name) and the byte offset.
    fn address<'t>(&self, frame: &Frame, arg: &'t [Token]) -> (Result<u64, &'t str>, u64) {
        assert!(arg[0].is("[") && arg.last().unwrap().is("]"), "address {arg:?}");
        let inner = &arg[1..arg.len() - 1];
        let off = if inner.len() == 3 { inner[2].text.parse::<u64>().unwrap() } else { 0 };
        let name = &inner[0].text;
        let base = if let Some(v) = frame.regs.get(name) {
            Ok(*v)
        } else if let Some(a) = self.symbols.get(name) {
            Ok(*a)
        } else {
            Err(name.as_str())
        };
        (base, off)
    }

    /// Runs a thread until a barrier or the end.
    fn run(&mut self, stack: &mut Vec<Frame<'a>>, ctx: &Ctx) -> Stop {
        loop {
            let depth = stack.len() - 1;
            let frame = &stack[depth];
            let Some(line) = frame.f.lines.get(frame.pc).cloned() else { return Stop::Done };
            stack[depth].pc += 1;
            let (guard, op, args) = match line {
                Line::Label(_) => continue,
                Line::ParamDecl(name, size) => {
                    stack[depth].params.insert(name, vec![0; size.max(8)]);
                    continue;
                }
                Line::Inst { guard, op, args } => (guard, op, args),
            };
            let frame = &stack[depth];
            if let Some((neg, p)) = &guard {
                if (frame.regs.get(p).copied().unwrap_or(0) != 0) == *neg {
                    continue;
                }
            }
            let v = |i: usize| self.value(frame, ctx, &args[i]);
            let base = op.split('.').next().unwrap();
            let dst = args.first().map(|a| a[0].text.clone()).unwrap_or_default();
            let result: Option<u64> = match base {
                "ret" => {
                    if stack.len() == 1 {
                        return Stop::Done;
                    }
                    let callee = stack.pop().unwrap();
                    let caller = stack.last_mut().unwrap();
                    if let (Some(r), Some(bytes)) = (&callee.f.ret, callee.params.get(callee.f.ret.as_deref().unwrap_or(""))) {
                        let _ = r;
                        let slot = caller.params.keys().find(|k| k.starts_with("retval")).cloned().unwrap();
                        caller.params.insert(slot, bytes.clone());
                    }
                    continue;
                }
                "bar" | "barrier" => return Stop::Barrier,
                "bra" => {
                    let target = &args[0][0].text;
                    stack[depth].pc = frame.f.labels[target];
                    continue;
                }
                "call" => {
                    let names: Vec<String> = args.iter().flatten().filter(|t| t.kind == Kind::Word).map(|t| t.text.clone()).collect();
                    let at = names.iter().position(|n| self.prog.funcs.contains_key(n)).expect("callee");
                    let callee = &self.prog.funcs[&names[at]];
                    let mut params: HashMap<String, Vec<u8>> = HashMap::new();
                    for (p, a) in callee.params.iter().zip(&names[at + 1..]) {
                        params.insert(p.clone(), frame.params[a].clone());
                    }
                    if let Some(r) = &callee.ret {
                        params.insert(r.clone(), vec![0; 8]);
                    }
                    stack.push(Frame { f: callee, pc: 0, regs: HashMap::new(), params });
                    continue;
                }
                "ld" | "st" | "red" | "atom" => {
                    let store = base == "st" || base == "red";
                    let addr_arg = if store { &args[0] } else { &args[1] };
                    let n = width(&op);
                    let (b, off) = self.address(frame, addr_arg);
                    let space = op.split('.').nth(1).unwrap();
                    match (space, b) {
                        ("param", Err(name)) => {
                            let bytes = frame.params.get(name).unwrap_or_else(|| panic!("param {name}"));
                            let mut buf = [0u8; 8];
                            buf[..n].copy_from_slice(&bytes[off as usize..off as usize + n]);
                            if store {
                                let val = mask(self.value(frame, ctx, &args[1]), n);
                                let slot = stack[depth].params.get_mut(name).unwrap();
                                slot[off as usize..off as usize + n].copy_from_slice(&val.to_le_bytes()[..n]);
                                None
                            } else {
                                Some(u64::from_le_bytes(buf))
                            }
                        }
                        (_, Ok(addr)) => {
                            // The value stored or added: `st`/`red` take it second, `atom` third.
                            let operand = match base {
                                "ld" => 0,
                                "atom" => self.value(frame, ctx, &args[2]),
                                _ => self.value(frame, ctx, &args[1]),
                            };
                            let mem = if space == "shared" { &mut self.shared } else { &mut *self.global };
                            let a = addr + off;
                            let old = mem.read(a, n);
                            match base {
                                "ld" => Some(old),
                                "st" => {
                                    mem.write(a, n, mask(operand, n));
                                    None
                                }
                                _ => {
                                    assert!(op.contains(".add."), "{op}");
                                    mem.write(a, n, mask(old.wrapping_add(operand), n));
                                    (base == "atom").then_some(old)
                                }
                            }
                        }
                        (s, Err(name)) => panic!("{op}: {name} in {s}"),
                    }
                }
                _ => Some(self.alu(&op, base, &args, &v)),
            };
            if let Some(r) = result {
                let n = if base == "setp" { 8 } else { width(&op) };
                let n = if op.starts_with("mul.wide") { 8 } else { n };
                stack[depth].regs.insert(dst, mask(r, n));
            }
        }
    }

    fn alu(&self, op: &str, base: &str, args: &[Vec<Token>], v: &dyn Fn(usize) -> u64) -> u64 {
        let n = width(op);
        let s = |x: u64| signed(x, n);
        match base {
            "mov" | "cvta" | "cvt" => v(1),
            "add" => v(1).wrapping_add(v(2)),
            "sub" => v(1).wrapping_sub(v(2)),
            "mul" if op.starts_with("mul.wide") => mask(v(1), 4).wrapping_mul(mask(v(2), 4)),
            "mul" => v(1).wrapping_mul(v(2)),
            "mad" => v(1).wrapping_mul(v(2)).wrapping_add(v(3)),
            "rem" => v(1) % v(2),
            "xor" => v(1) ^ v(2),
            "or" => v(1) | v(2),
            "and" => v(1) & v(2),
            "not" => !v(1),
            "shl" => v(1) << v(2),
            "shr" => mask(v(1), n) >> v(2),
            "selp" => {
                if v(3) != 0 {
                    v(1)
                } else {
                    v(2)
                }
            }
            "setp" => {
                let (a, b) = (mask(v(1), n), mask(v(2), n));
                let cmp = op.split('.').nth(1).unwrap();
                let is_signed = op.ends_with("s32") || op.ends_with("s64");
                let ord = if is_signed { s(a).cmp(&s(b)) } else { a.cmp(&b) };
                use std::cmp::Ordering::*;
                (match cmp {
                    "eq" => ord == Equal,
                    "ne" => ord != Equal,
                    "lt" => ord == Less,
                    "le" => ord != Greater,
                    "gt" => ord == Greater,
                    "ge" => ord != Less,
                    _ => panic!("{op}"),
                }) as u64
            }
            _ => panic!("unsupported instruction {op} {args:?}"),
        }
    }
}

/// A launch: grid, block, dynamic shared bytes, and the packed parameter buffer.
pub struct Launch<'a> {
    pub kernel: &'a str,
    pub grid: Dim3,
    pub block: Dim3,
    pub dynamic_shared: u64,
    /// Parameter name → bytes, for the kernel's parameters in order.
    pub params: Vec<Vec<u8>>,
}

/// Runs a launch against `global`, blocks in row-major order.
pub fn launch(prog: &Program, global: &mut Memory, l: &Launch) {
    let f = prog.funcs.get(l.kernel).unwrap_or_else(|| panic!("no kernel {}", l.kernel));
    assert_eq!(f.params.len(), l.params.len(), "{}: parameter count", l.kernel);
    let mut symbols = HashMap::new();
    let mut top = 0u64;
    for (name, size, align) in prog.shared.iter().chain(&f.shared) {
        top = top.next_multiple_of(*align);
        symbols.insert(name.clone(), top);
        top += size;
    }
    if let Some(d) = &prog.dynamic {
        top = top.next_multiple_of(16);
        symbols.insert(d.clone(), top);
        top += l.dynamic_shared;
    }
    let params: HashMap<String, Vec<u8>> = f.params.iter().cloned().zip(l.params.iter().cloned()).collect();
    let dim = |d: Dim3| [d.x as u64, d.y as u64, d.z as u64];
    for bz in 0..l.grid.z {
        for by in 0..l.grid.y {
            for bx in 0..l.grid.x {
                let mut block = Block { prog, global, shared: Memory(vec![0; top as usize]), symbols: symbols.clone() };
                let threads: Vec<Ctx> = (0..l.block.volume())
                    .map(|t| Ctx {
                        tid: [t % l.block.x as u64, t / l.block.x as u64 % l.block.y as u64, t / (l.block.x as u64 * l.block.y as u64)],
                        ntid: dim(l.block),
                        ctaid: [bx as u64, by as u64, bz as u64],
                        nctaid: dim(l.grid),
                    })
                    .collect();
                let mut stacks: Vec<Vec<Frame>> = threads.iter().map(|_| vec![Frame { f, pc: 0, regs: HashMap::new(), params: params.clone() }]).collect();
                let mut done = vec![false; threads.len()];
                while done.iter().any(|d| !d) {
                    for (i, ctx) in threads.iter().enumerate() {
                        if !done[i] {
                            done[i] = matches!(block.run(&mut stacks[i], ctx), Stop::Done);
                        }
                    }
                }
            }
        }
    }
}
