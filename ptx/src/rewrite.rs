//! The sliced form of a module: every kernel that can be sliced gets one trailing parameter
//! `.param .align 4 .b8 __gpuslice_slice[24]` (block offset x,y,z then the original grid x,y,z, as
//! `u32`), and reads `%ctaid.c + offset.c` wherever it read `%ctaid.c` and the original grid wherever
//! it read `%nctaid.c`. Kernels that cannot be sliced stay as they are, with the reasons.

use crate::analyze::{facts, grid_register, FuncFacts};
use crate::calls;
use crate::lex::tokens;
use crate::names::{REG, SLICE_PARAM_ALIGN, SLICE_PARAM_NAME, SLICE_PARAM_SIZE};
use crate::params::{layout, total_size, ParamSlot};
use crate::syntax::{signature, statements_mut, Item, Module, ParseError, Scope};
use crate::TRANSFORMER_VERSION;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelOutcome {
    pub name: String,
    pub sliced: bool,
    /// Why the kernel was left as it is (empty when sliced).
    pub reasons: Vec<String>,
    pub notes: Vec<String>,
    /// The kernel's own parameters (unchanged by slicing).
    pub params: Vec<ParamSlot>,
    /// Where the slice parameter goes in a packed parameter buffer (`None` when not sliced).
    pub slice_param: Option<ParamSlot>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleOutcome {
    pub transformer: String,
    /// The module with every sliceable kernel rewritten (the input, if none was).
    pub ptx: String,
    pub kernels: Vec<KernelOutcome>,
}

impl ModuleOutcome {
    pub fn kernel(&self, name: &str) -> Option<&KernelOutcome> {
        self.kernels.iter().find(|k| k.name == name)
    }
}

/// Bytes of kernel parameters the driver accepts: 4 KiB before PTX ISA 8.1, 32764 from 8.1 on
/// (sm_70 and newer, which is all this crate targets).
fn param_limit(module: &Module) -> u32 {
    let version = module.items.iter().find_map(|item| match item {
        Item::Stmt(t) if t[0].is(".version") => t.get(1).map(|v| v.text.clone()),
        _ => None,
    });
    let (major, minor) = version.as_deref().and_then(|v| v.split_once('.')).map_or((0, 0), |(a, b)| (a.parse().unwrap_or(0), b.parse().unwrap_or(0)));
    if (major, minor) >= (8, 1) {
        32764
    } else {
        4096
    }
}

/// Every function reachable from `entry` through direct calls, itself included.
fn reachable<'a>(entry: &'a FuncFacts, funcs: &'a HashMap<String, FuncFacts>) -> Vec<&'a FuncFacts> {
    let mut seen = BTreeSet::new();
    let mut out = vec![entry];
    let mut next = 0;
    while next < out.len() {
        for callee in &out[next].callees {
            if let Some(f) = funcs.get(callee) {
                if seen.insert(callee.clone()) {
                    out.push(f);
                }
            }
        }
        next += 1;
    }
    out
}

/// The reasons `entry` cannot be sliced, given every function's facts and the device functions that
/// need the slice parameter (`grid_funcs`).
fn refusals(entry: &FuncFacts, funcs: &HashMap<String, FuncFacts>, grid_funcs: &BTreeSet<String>, name_clash: bool) -> (Vec<String>, Vec<String>) {
    let mut reasons = Vec::new();
    let mut notes = Vec::new();
    if name_clash {
        reasons.push(format!("the module already uses names with `__gpuslice` or `{REG}` (sliced twice?)"));
    }
    let reach = reachable(entry, funcs);
    for f in &reach {
        let place = if f.is_entry { String::new() } else { format!("device function `{}` ", f.name) };
        reasons.extend(f.refusals.iter().map(|r| format!("{place}{r}")));
        notes.extend(f.notes.iter().map(|n| format!("{place}{n}")));
        if grid_funcs.contains(&f.name) {
            notes.push(format!(
                "device function `{}` reads %ctaid/%nctaid (itself or through its calls): called as a clone that takes the slice parameter",
                f.name
            ));
        }
    }
    if reach.iter().any(|f| f.indirect_calls) && (!grid_funcs.is_empty() || funcs.values().any(|f| !f.refusals.is_empty())) {
        reasons.push("calls through a function pointer, and a device function of the module reads %ctaid/%nctaid or cannot be sliced".to_string());
    }
    (reasons, notes)
}

/// The statements that compute the sliced block index and grid size into `%gpuslice0..5`.
fn prologue() -> Vec<Item> {
    let p = SLICE_PARAM_NAME;
    let mut text = format!("\n\t.reg .b32 \t{REG}<7>;");
    for (axis, comp) in ["x", "y", "z"].iter().enumerate() {
        let at = if axis == 0 { String::new() } else { format!("+{}", 4 * axis) };
        text += &format!("\n\tld.param.u32 \t{REG}{axis}, [{p}{at}];\n\tmov.u32 \t{REG}6, %ctaid.{comp};\n\tadd.u32 \t{REG}{axis}, {REG}{axis}, {REG}6;");
    }
    for axis in 0..3 {
        text += &format!("\n\tld.param.u32 \t{REG}{}, [{p}+{}];", axis + 3, 12 + 4 * axis);
    }
    Module::parse(&text).map(|m| m.items).unwrap_or_default()
}

/// Rewrites a kernel, or a device function's clone, in place: grid reads, calls to functions that
/// need the slice parameter, the prologue, the added parameter. Its parameter list must be a
/// `( ... )` (checked by the caller).
fn rewrite_function(function: &mut Scope, grid_funcs: &BTreeSet<String>) {
    statements_mut(&mut function.items, &mut |stmt| {
        for t in stmt.iter_mut() {
            if let Some((nctaid, axis)) = grid_register(&t.text) {
                t.text = format!("{REG}{}", axis + if nctaid { 3 } else { 0 });
            }
        }
    });
    calls::redirect(&mut function.items, grid_funcs);
    // After the function's own declarations (registers, demoted shared variables), before its code.
    let at = function.items.iter().take_while(|i| matches!(i, Item::Stmt(t) if t[0].text.starts_with('.'))).count();
    function.items.splice(at..at, prologue());
    let sig = signature(&function.header).expect("caller checked the signature");
    let decl = format!(".param .align {SLICE_PARAM_ALIGN} .b8 {SLICE_PARAM_NAME}[{SLICE_PARAM_SIZE}]");
    if sig.params_close == sig.params_open + 1 {
        function.header.splice(sig.params_close..sig.params_close, tokens(&format!("\n\t{decl}")));
        function.header[sig.params_close + tokens(&decl).len()].trivia = "\n".to_string();
    } else {
        function.header.splice(sig.params_close..sig.params_close, tokens(&format!(",\n\t{decl}")));
    }
}

/// A module-internal copy of device function `original` that takes the slice parameter.
fn clone_function(original: &Scope, grid_funcs: &BTreeSet<String>) -> Scope {
    let mut clone = original.clone();
    calls::rename_for_clone(&mut clone.header);
    rewrite_function(&mut clone, grid_funcs);
    clone
}

/// Slices every kernel of the PTX module `text` that can be sliced.
pub fn slice_module(text: &str) -> Result<ModuleOutcome, ParseError> {
    let mut module = Module::parse(text)?;
    let all_facts: Vec<Option<FuncFacts>> = module.items.iter().map(|i| if let Item::Scope(s) = i { facts(s) } else { None }).collect();
    let funcs: HashMap<String, FuncFacts> = all_facts.iter().flatten().filter(|f| !f.is_entry).map(|f| (f.name.clone(), f.clone())).collect();
    let grid_funcs = calls::needing_the_slice(&funcs);
    let name_clash = text.contains("__gpuslice") || text.contains(REG);
    let limit = param_limit(&module);
    let has_param_list = |s: &Scope| signature(&s.header).is_some_and(|sig| s.header[sig.params_open].is("("));
    let defined: HashMap<String, bool> = module
        .items
        .iter()
        .zip(&all_facts)
        .filter_map(|(i, f)| match (i, f) {
            (Item::Scope(s), Some(f)) => Some((f.name.clone(), has_param_list(s))),
            _ => None,
        })
        .collect();
    let mut kernels = Vec::new();
    let mut cloned = BTreeSet::new();
    for (item, f) in module.items.iter_mut().zip(&all_facts) {
        let (Item::Scope(scope), Some(f)) = (item, f) else { continue };
        if !f.is_entry {
            continue;
        }
        let (mut reasons, notes) = refusals(f, &funcs, &grid_funcs, name_clash);
        let needed: Vec<String> = reachable(f, &funcs).iter().filter(|g| grid_funcs.contains(&g.name)).map(|g| g.name.clone()).collect();
        for g in needed.iter().filter(|g| !defined.get(*g).copied().unwrap_or(false)) {
            reasons.push(format!("device function `{g}` reads %ctaid/%nctaid and has no parameter list to add the slice parameter to"));
        }
        let params = if has_param_list(scope) {
            let sig = signature(&scope.header).expect("facts found a signature");
            layout(&scope.header[sig.params_open + 1..sig.params_close]).unwrap_or_else(|e| {
                reasons.push(format!("parameter list: {e}"));
                Vec::new()
            })
        } else {
            reasons.push("has no parameter list to add the slice parameter to".to_string());
            Vec::new()
        };
        let slot = ParamSlot {
            name: SLICE_PARAM_NAME.to_string(),
            offset: total_size(&params).next_multiple_of(SLICE_PARAM_ALIGN),
            size: SLICE_PARAM_SIZE,
            align: SLICE_PARAM_ALIGN,
        };
        if slot.offset + slot.size > limit {
            reasons.push(format!("parameters take {} bytes; with the slice parameter they would pass the driver's {limit}", total_size(&params)));
        }
        let sliced = reasons.is_empty();
        if sliced {
            rewrite_function(scope, &grid_funcs);
            cloned.extend(needed);
        }
        kernels.push(KernelOutcome { name: f.name.clone(), sliced, reasons, notes, params, slice_param: sliced.then_some(slot) });
    }
    add_clones(&mut module, &cloned, &grid_funcs);
    Ok(ModuleOutcome { transformer: TRANSFORMER_VERSION.to_string(), ptx: module.print(), kernels })
}

/// Puts each clone right after its original, and a declaration of every clone before the first
/// function (PTX wants a function declared before any call to it).
fn add_clones(module: &mut Module, cloned: &BTreeSet<String>, grid_funcs: &BTreeSet<String>) {
    if cloned.is_empty() {
        return;
    }
    let mut items = Vec::with_capacity(module.items.len() + 2 * cloned.len());
    let mut declarations = Vec::new();
    for item in std::mem::take(&mut module.items) {
        let clone = match &item {
            Item::Scope(s) => signature(&s.header).filter(|sig| cloned.contains(&sig.name)).map(|_| clone_function(s, grid_funcs)),
            _ => None,
        };
        if let Some(c) = &clone {
            declarations.push(calls::declaration(&c.header));
        }
        items.push(item);
        items.extend(clone.map(Item::Scope));
    }
    let first_function = items.iter().position(|i| matches!(i, Item::Scope(s) if signature(&s.header).is_some())).unwrap_or(items.len());
    items.splice(first_function..first_function, declarations);
    module.items = items;
}
