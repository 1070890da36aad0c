//! Device functions that read the grid: which need the slice parameter (those that read
//! `%ctaid`/`%nctaid`, and every function that calls one), their clones' headers, and the calls
//! redirected to the clones with the slice parameter passed on. The originals stay for the kernels
//! that are not sliced.

use crate::analyze::{callee_at, opcode, FuncFacts};
use crate::lex::{tokens, Token};
use crate::names::{REG, SLICE_PARAM_NAME};
use crate::syntax::{signature, Item, Module, Scope};
use std::collections::{BTreeSet, HashMap};

/// Appended to a device function's name for its clone.
pub const CLONE_SUFFIX: &str = "__gpuslice";
/// The call-sequence parameter that carries the slice parameter to a clone.
const ARG: &str = "__gpuslice_arg";

/// The device functions that read the grid, themselves or through the functions they call.
pub fn needing_the_slice(funcs: &HashMap<String, FuncFacts>) -> BTreeSet<String> {
    let mut set: BTreeSet<String> = funcs.values().filter(|f| f.reads_grid).map(|f| f.name.clone()).collect();
    loop {
        let before = set.len();
        let callers: Vec<String> = funcs.values().filter(|f| f.callees.iter().any(|c| set.contains(c))).map(|f| f.name.clone()).collect();
        set.extend(callers);
        if set.len() == before {
            return set;
        }
    }
}

/// A clone's header: the linkage (`.visible`, `.weak`) dropped, since the clone is the module's own,
/// and the name suffixed.
pub fn rename_for_clone(header: &mut Vec<Token>) {
    let trivia = header.first().map(|t| t.trivia.clone()).unwrap_or_default();
    header.retain(|t| !matches!(t.text.as_str(), ".visible" | ".weak" | ".extern"));
    if let Some(first) = header.first_mut() {
        first.trivia = trivia;
    }
    if let Some(sig) = signature(header) {
        let at = if header[sig.params_open].is("(") { sig.params_open - 1 } else { sig.params_open };
        header[at].text += CLONE_SUFFIX;
    }
}

/// A declaration (`header;`) for a function defined later in the module.
pub fn declaration(header: &[Token]) -> Item {
    let mut toks = header.to_vec();
    toks.extend(tokens("\n;"));
    Item::Stmt(toks)
}

/// Adds `__gpuslice_arg` to the argument list that follows the callee at `callee` (or gives the
/// call one).
fn add_argument(stmt: &mut Vec<Token>, callee: usize) {
    let open = stmt.iter().enumerate().skip(callee + 1).take_while(|(_, t)| !t.is(";")).find(|(_, t)| t.is("(")).map(|(i, _)| i);
    let Some(open) = open else {
        stmt.splice(callee + 1..callee + 1, tokens(&format!(", ({ARG})")));
        return;
    };
    let mut depth = 0usize;
    let close = stmt.iter().enumerate().skip(open).find(|(_, t)| {
        depth = if t.is("(") {
            depth + 1
        } else if t.is(")") {
            depth - 1
        } else {
            depth
        };
        depth == 0
    });
    let close = close.map_or(stmt.len() - 1, |(i, _)| i);
    let text = if close == open + 1 { format!("\n\t{ARG}\n\t") } else { format!(", \n\t{ARG}\n\t") };
    stmt.splice(close..close, tokens(&text));
}

/// The statements that fill the call's copy of the slice parameter from this function's own.
fn argument_setup() -> Vec<Item> {
    let mut text = format!("\n\t.param .align 4 .b8 {ARG}[24];");
    for word in 0..6 {
        let at = if word == 0 { String::new() } else { format!("+{}", 4 * word) };
        text += &format!("\n\tld.param.u32 \t{REG}6, [{SLICE_PARAM_NAME}{at}];\n\tst.param.b32 \t[{ARG}{at}], {REG}6;");
    }
    Module::parse(&text).map(|m| m.items).unwrap_or_default()
}

/// Redirects every direct call to a function of `grid_funcs` to its clone, passing the slice
/// parameter on; each such call goes into a `{ }` block of its own with the argument's declaration.
pub fn redirect(items: &mut [Item], grid_funcs: &BTreeSet<String>) {
    for item in items.iter_mut() {
        let stmt = match item {
            Item::Scope(s) => {
                redirect(&mut s.items, grid_funcs);
                continue;
            }
            Item::Stmt(stmt) => stmt,
            Item::Label(..) => continue,
        };
        let Some((op_at, op)) = opcode(stmt) else { continue };
        if !op.starts_with("call") {
            continue;
        }
        let Some(callee) = callee_at(stmt, op_at).filter(|&c| grid_funcs.contains(&stmt[c].text)) else { continue };
        let mut call = stmt.clone();
        call[callee].text += CLONE_SUFFIX;
        add_argument(&mut call, callee);
        let mut block = argument_setup();
        block.push(Item::Stmt(call));
        let mut brace = tokens("{ }");
        brace[0].trivia = "\n\t".to_string();
        brace[1].trivia = "\n\t".to_string();
        let close = brace.pop().expect("two tokens");
        *item = Item::Scope(Scope { header: Vec::new(), open: brace.pop().expect("two tokens"), items: block, close });
    }
}
