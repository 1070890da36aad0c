//! What each function of a module reads and calls, and the reasons a kernel cannot be sliced: the
//! facts the rewrite decides on.

use crate::lex::{Kind, Token};
use crate::syntax::{signature, statements, FuncKind, Scope};
use std::collections::HashMap;

/// The grid registers the rewrite replaces: `%ctaid.{x,y,z}` and `%nctaid.{x,y,z}`.
pub fn grid_register(text: &str) -> Option<(bool, usize)> {
    let (base, comp) = text.split_once('.')?;
    let nctaid = match base {
        "%ctaid" => false,
        "%nctaid" => true,
        _ => return None,
    };
    let axis = ["x", "y", "z"].iter().position(|c| *c == comp)?;
    Some((nctaid, axis))
}

/// Special registers whose value a sliced launch does not change (per thread, per SM, clocks,
/// shared memory sizes). `%smid`/`%nsmid`/`%warpid` are on this list, with a note: a slice runs on
/// whichever SMs are free, as any block of the original grid could.
const SAME_IN_A_SLICE: [&str; 22] = [
    "%tid",
    "%ntid",
    "%laneid",
    "%warpid",
    "%nwarpid",
    "%smid",
    "%nsmid",
    "%lanemask_eq",
    "%lanemask_le",
    "%lanemask_lt",
    "%lanemask_ge",
    "%lanemask_gt",
    "%clock",
    "%clock_hi",
    "%clock64",
    "%globaltimer",
    "%globaltimer_lo",
    "%globaltimer_hi",
    "%dynamic_smem_size",
    "%total_smem_size",
    "%aggr_smem_size",
    "%reserved_smem_offset_begin",
];

/// Header directives that tie a kernel to thread-block clusters: a slice's grid would have to be a
/// multiple of the cluster shape and `%clusterid` would need its own offset.
const CLUSTER_DIRECTIVES: [&str; 4] = [".reqnctapercluster", ".explicitcluster", ".maxclusterrank", ".blocksareclusters"];

/// Device-runtime functions behind cooperative groups' grid synchronization (older toolkits call
/// them; newer ones read the grid workspace from `%envreg`).
const GRID_SYNC_CALLS: [&str; 3] = ["cudaCGSynchronize", "cudaCGSynchronizeGrid", "cudaCGGetIntrinsicHandle"];

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FuncFacts {
    pub name: String,
    pub is_entry: bool,
    /// Reads `%ctaid.*` or `%nctaid.*`.
    pub reads_grid: bool,
    /// Why this function's code cannot run in a slice (empty when it can).
    pub refusals: Vec<String>,
    /// Worth saying but no obstacle.
    pub notes: Vec<String>,
    pub callees: Vec<String>,
    /// Calls through a register (a function pointer).
    pub indirect_calls: bool,
}

/// Registers a function declares with `.reg`: exact names, and `%r<N>` ranges as prefix → N.
#[derive(Default)]
struct Declared {
    names: Vec<String>,
    ranges: HashMap<String, u64>,
}

impl Declared {
    /// From the body's `.reg` statements and a device function's `.reg` parameters (`header`).
    fn collect(header: &[Token], stmts: &[&[Token]]) -> Declared {
        let mut d = Declared::default();
        for (i, _) in header.iter().enumerate().filter(|(_, t)| t.is(".reg")) {
            if let Some(name) = header[i + 1..].iter().find(|t| !t.text.starts_with('.')).filter(|t| t.kind == Kind::Word) {
                d.names.push(name.text.clone());
            }
        }
        for s in stmts.iter().filter(|s| s[0].is(".reg")) {
            let mut i = 1;
            while i < s.len() {
                let t = &s[i];
                if t.kind == Kind::Word && !t.text.starts_with('.') && t.text.parse::<u64>().is_err() {
                    match (s.get(i + 1), s.get(i + 2)) {
                        (Some(lt), Some(n)) if lt.is("<") => {
                            d.ranges.insert(t.text.clone(), n.text.parse().unwrap_or(0));
                            i += 3;
                        }
                        _ => d.names.push(t.text.clone()),
                    }
                }
                i += 1;
            }
        }
        d
    }

    fn has(&self, name: &str) -> bool {
        if self.names.iter().any(|n| n == name) {
            return true;
        }
        let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
        let (prefix, index) = name.split_at(name.len() - digits);
        digits > 0 && index.parse::<u64>().is_ok_and(|i| self.ranges.get(prefix).is_some_and(|&n| i < n))
    }
}

/// The opcode of an instruction statement (after any `@p`/`@!p` guard); `None` for directives.
pub fn opcode(stmt: &[Token]) -> Option<(usize, &str)> {
    let at = if stmt[0].is("@") { stmt.iter().position(|t| t.kind == Kind::Word)? + 1 } else { 0 };
    let op = stmt.get(at)?;
    (op.kind == Kind::Word && !op.text.starts_with('.')).then_some((at, op.text.as_str()))
}

/// Whether an instruction's operand type (its last type suffix: the source type of `cvt`) is 32 bits,
/// so that a `.b32` register can stand where the special register stood.
fn reads_32_bits(op: &str) -> bool {
    matches!(op.rsplit('.').next(), Some("u32" | "s32" | "b32"))
}

/// Index of the called function's name in a `call` statement whose opcode is at `op_at`: the first
/// word outside parentheses (`call.uni (retval0), name, (param0);`).
pub fn callee_at(stmt: &[Token], op_at: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, t) in stmt.iter().enumerate().skip(op_at + 1) {
        match t.text.as_str() {
            "(" => depth += 1,
            ")" => depth = depth.saturating_sub(1),
            _ if depth == 0 && t.kind == Kind::Word => return Some(i),
            _ => {}
        }
    }
    None
}

fn push_once(list: &mut Vec<String>, text: String) {
    if !list.contains(&text) {
        list.push(text);
    }
}

/// The facts of one function definition; `None` if `scope` is not one.
pub fn facts(scope: &Scope) -> Option<FuncFacts> {
    let sig = signature(&scope.header)?;
    let mut f = FuncFacts { name: sig.name, is_entry: sig.kind == FuncKind::Entry, ..FuncFacts::default() };
    for t in &scope.header[sig.params_close..] {
        if CLUSTER_DIRECTIVES.contains(&t.text.as_str()) {
            push_once(&mut f.refusals, format!("uses thread-block clusters (`{}`)", t.text));
        } else if t.is(".maxnctapersm") || t.is(".minnctapersm") {
            push_once(&mut f.notes, format!("`{}` is an occupancy hint; a slice keeps it", t.text));
        }
    }
    let stmts = statements(&scope.items);
    let declared = Declared::collect(&scope.header, &stmts);
    for stmt in &stmts {
        let Some((op_at, op)) = opcode(stmt) else { continue };
        if op.starts_with("call") {
            match callee_at(stmt, op_at).map(|i| &stmt[i]) {
                Some(c) if c.text.starts_with('%') => f.indirect_calls = true,
                Some(c) if GRID_SYNC_CALLS.contains(&c.text.as_str()) => {
                    push_once(&mut f.refusals, format!("synchronizes the whole grid (calls `{}`)", c.text));
                }
                Some(c) => push_once(&mut f.callees, c.text.clone()),
                None => {}
            }
        }
        if op.starts_with("barrier.cluster") || op.starts_with("mapa") || op.contains("::cluster") {
            push_once(&mut f.refusals, format!("uses thread-block clusters (`{op}`)"));
        }
        for t in stmt[op_at + 1..].iter().filter(|t| t.text.starts_with('%')) {
            register_fact(&mut f, &declared, op, &t.text);
        }
    }
    Some(f)
}

fn register_fact(f: &mut FuncFacts, declared: &Declared, op: &str, reg: &str) {
    if declared.has(reg) {
        return;
    }
    if grid_register(reg).is_some() {
        f.reads_grid = true;
        if !reads_32_bits(op) {
            push_once(&mut f.refusals, format!("reads `{reg}` with `{op}`, not as a 32-bit operand"));
        }
        return;
    }
    let base = reg.split('.').next().unwrap_or(reg);
    let refusal = match base {
        "%ctaid" | "%nctaid" => format!("reads `{reg}` as a whole vector"),
        "%gridid" => "reads `%gridid`, which differs between the launches of a slice".to_string(),
        _ if base.starts_with("%envreg") => format!("reads `{base}` (the cooperative-launch grid workspace: grid synchronization)"),
        _ if base.contains("cluster") => format!("uses thread-block clusters (`{reg}`)"),
        _ if base.starts_with("%pm") => return,
        _ if SAME_IN_A_SLICE.contains(&base) || base.starts_with("%reserved_smem") => {
            if matches!(base, "%smid" | "%nsmid" | "%warpid") {
                push_once(&mut f.notes, format!("reads `{base}`: fine, a slice runs on whichever SMs are free"));
            }
            return;
        }
        _ => format!("reads `{reg}`, a register that is neither declared nor a special register known to be the same in a slice"),
    };
    push_once(&mut f.refusals, refusal);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syntax::{Item, Module};

    fn facts_of(ptx: &str) -> FuncFacts {
        let m = Module::parse(ptx).unwrap();
        let Item::Scope(s) = &m.items[0] else { panic!("not a function") };
        facts(s).unwrap()
    }

    #[test]
    fn register_parameters_of_a_device_function_are_declared() {
        let f = facts_of(".func (.reg .b32 %ret) add1(.reg .b32 %a)\n{\n\tadd.u32 \t%ret, %a, 1;\n\tret;\n}\n");
        assert!(f.refusals.is_empty(), "{:?}", f.refusals);
    }

    #[test]
    fn ranges_cover_their_indices_only() {
        let f = facts_of(".visible .entry k()\n{\n\t.reg .b32 \t%r<3>;\n\tmov.u32 \t%r2, %tid.x;\n\tmov.u32 \t%r3, %r2;\n}\n");
        assert_eq!(f.refusals.len(), 1, "{:?}", f.refusals);
        assert!(f.refusals[0].contains("`%r3`"));
        assert!(!f.reads_grid);
    }
}
