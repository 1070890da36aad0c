//! The slicer on PTX text: every fixture round-trips through the parser unchanged, each kernel gets
//! the verdict it should (sliced, or refused with the reason), and a sliced kernel reads the grid
//! registers only where the prologue adds the offset.

use gpuslice_ptx::syntax::Module;
use gpuslice_ptx::{slice_module, KernelOutcome, ModuleOutcome, SLICE_PARAM_NAME};

const FIXTURES: [(&str, &str); 3] =
    [("suite", include_str!("fixtures/suite.ptx")), ("refuse", include_str!("fixtures/refuse.ptx")), ("edge", include_str!("fixtures/edge.ptx"))];

fn fixture(name: &str) -> &'static str {
    FIXTURES.iter().find(|(n, _)| *n == name).unwrap().1
}

fn kernel<'a>(m: &'a ModuleOutcome, name: &str) -> &'a KernelOutcome {
    m.kernel(name).unwrap_or_else(|| panic!("no kernel {name} in {:?}", m.kernels.iter().map(|k| &k.name).collect::<Vec<_>>()))
}

fn assert_refused(m: &ModuleOutcome, name: &str, reason: &str) {
    let k = kernel(m, name);
    assert!(!k.sliced && k.slice_param.is_none(), "{name} was sliced");
    assert!(k.reasons.iter().any(|r| r.contains(reason)), "{name}: no reason containing {reason:?} in {:?}", k.reasons);
}

fn assert_sliced<'a>(m: &'a ModuleOutcome, name: &str) -> &'a KernelOutcome {
    let k = kernel(m, name);
    assert!(k.sliced, "{name} refused: {:?}", k.reasons);
    k
}

/// The text of the kernel `name` in `ptx`, from its `.entry` line to the closing brace.
fn kernel_text<'a>(ptx: &'a str, name: &str) -> &'a str {
    let start = ptx.find(&format!(".entry {name}(")).unwrap();
    let end = start + ptx[start..].find("\n}").unwrap();
    &ptx[start..end]
}

#[test]
fn every_fixture_round_trips_unchanged() {
    for (name, text) in FIXTURES {
        let m = Module::parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(m.print(), text, "{name}");
    }
}

#[test]
fn every_suite_kernel_is_sliced() {
    let m = slice_module(fixture("suite")).unwrap();
    let names: Vec<&str> = m.kernels.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "fill_1d",
            "fill_2d",
            "fill_3d",
            "grid_stride",
            "block_sum_static",
            "reverse_dynamic",
            "histogram",
            "uses_helper",
            "helper_reads_ctaid",
            "helper_chain"
        ]
    );
    for name in &names {
        assert_sliced(&m, name);
    }
    let chain = kernel(&m, "helper_chain");
    for f in ["_Z9outer_keyj", "_Z9block_keyv"] {
        assert!(chain.notes.iter().any(|n| n.contains(f) && n.contains("clone")), "{f}: {:?}", chain.notes);
    }
    assert!(kernel(&m, "uses_helper").notes.is_empty(), "mix reads no grid register");
}

/// The definition of device function `name` (not a declaration), from `.func` to the closing brace.
fn func_text<'a>(ptx: &'a str, name: &str) -> &'a str {
    for (start, _) in ptx.match_indices(".func") {
        let rest = &ptx[start..];
        let header_end = [rest.find("\n{"), rest.find("\n;")].into_iter().flatten().min().unwrap();
        let header = &rest[..header_end];
        if rest[header_end..].starts_with("\n{") && (header.contains(&format!(" {name}(")) || header.ends_with(&format!(" {name}"))) {
            return &rest[..rest.find("\n}").unwrap()];
        }
    }
    panic!("no definition of {name}")
}

#[test]
fn sliced_kernels_read_the_grid_only_in_the_prologue() {
    let m = slice_module(fixture("suite")).unwrap();
    let prologue_reads = ["\tmov.u32 \t%gpuslice6, %ctaid.x;", "\tmov.u32 \t%gpuslice6, %ctaid.y;", "\tmov.u32 \t%gpuslice6, %ctaid.z;"];
    let clones = [func_text(&m.ptx, "_Z9block_keyv__gpuslice"), func_text(&m.ptx, "_Z9outer_keyj__gpuslice")];
    for (name, text) in m.kernels.iter().map(|k| (k.name.as_str(), kernel_text(&m.ptx, &k.name))).chain(clones.iter().map(|t| ("clone", *t))) {
        assert!(!text.contains("%nctaid"), "{name}: %nctaid left");
        let ctaid_reads: Vec<&str> = text.lines().filter(|l| l.contains("%ctaid")).collect();
        assert_eq!(ctaid_reads, prologue_reads, "{name}");
        assert!(text.contains(&format!("\n\t.param .align 4 .b8 {SLICE_PARAM_NAME}[24]\n)")), "{name}: no slice parameter last");
    }
    // The device functions themselves are byte for byte the original (kernels that are not sliced
    // call them), and a clone is declared before the first kernel calls it.
    let original = fixture("suite");
    for f in ["_Z3mixj", "_Z9block_keyv", "_Z9outer_keyj"] {
        assert_eq!(func_text(&m.ptx, f), func_text(original, f));
    }
    assert!(m.ptx.find(".func  (.param .b32 func_retval0) _Z9block_keyv__gpuslice(").unwrap() < m.ptx.find(".entry fill_1d(").unwrap());
    assert!(!m.ptx.contains("_Z3mixj__gpuslice"), "mix reads no grid register: no clone");
}

#[test]
fn calls_to_grid_reading_functions_go_to_the_clone_with_the_slice() {
    let m = slice_module(fixture("suite")).unwrap();
    let chain = kernel_text(&m.ptx, "helper_chain");
    assert!(chain.contains("\t_Z9outer_keyj__gpuslice, \n\t(\n\tparam0, \n\t__gpuslice_arg\n\t);"), "{chain}");
    assert!(chain.contains("\tld.param.u32 \t%gpuslice6, [__gpuslice_slice+20];\n\tst.param.b32 \t[__gpuslice_arg+20], %gpuslice6;"));
    let outer = func_text(&m.ptx, "_Z9outer_keyj__gpuslice");
    assert!(outer.contains("_Z9block_keyv__gpuslice, \n\t(\n\t__gpuslice_arg\n\t);"), "{outer}");
    assert!(!outer.starts_with(".visible"));
}

#[test]
fn reads_are_replaced_by_the_offset_registers() {
    let m = slice_module(fixture("suite")).unwrap();
    let fill_3d = kernel_text(&m.ptx, "fill_3d");
    for line in ["mov.u32 \t%r1, %gpuslice2;", "mov.u32 \t%r2, %gpuslice4;", "mov.u32 \t%r6, %gpuslice0;", "mov.u32 \t%r11, %gpuslice5;"] {
        assert!(fill_3d.contains(line), "fill_3d lacks {line}");
    }
    let prologue = [
        "ld.param.u32 \t%gpuslice0, [__gpuslice_slice];",
        "add.u32 \t%gpuslice2, %gpuslice2, %gpuslice6;",
        "ld.param.u32 \t%gpuslice5, [__gpuslice_slice+20];",
    ];
    for line in prologue {
        assert!(fill_3d.contains(line), "fill_3d lacks {line}");
    }
    // The rewritten module parses again, prints back, and slicing it twice is refused.
    assert_eq!(Module::parse(&m.ptx).unwrap().print(), m.ptx);
    let twice = slice_module(&m.ptx).unwrap();
    assert_refused(&twice, "fill_1d", "sliced twice");
}

#[test]
fn parameter_layouts_and_where_the_slice_parameter_goes() {
    let m = slice_module(fixture("suite")).unwrap();
    let k = assert_sliced(&m, "grid_stride");
    let got: Vec<(u32, u32, u32)> = k.params.iter().map(|p| (p.offset, p.size, p.align)).collect();
    assert_eq!(got, [(0, 8, 8), (8, 8, 8), (16, 4, 4)]);
    let slot = k.slice_param.as_ref().unwrap();
    assert_eq!((slot.offset, slot.size, slot.align), (20, 24, 4));

    let e = slice_module(fixture("edge")).unwrap();
    let k = assert_sliced(&e, "direct_operands");
    let got: Vec<(u32, u32, u32)> = k.params.iter().map(|p| (p.offset, p.size, p.align)).collect();
    assert_eq!(got, [(0, 16, 8), (16, 1, 1), (24, 8, 8)]);
    assert_eq!(k.slice_param.as_ref().unwrap().offset, 32);
    let k = assert_sliced(&e, "no_params");
    assert!(k.params.is_empty());
    assert_eq!(k.slice_param.as_ref().unwrap().offset, 0);
    assert!(e.ptx.contains(".entry no_params(\n\t.param .align 4 .b8 __gpuslice_slice[24]\n)\n.maxntid 128, 1, 1"));
    assert!(k.notes.iter().any(|n| n.contains(".minnctapersm")), "{:?}", k.notes);
}

#[test]
fn refusals_name_their_reason() {
    let r = slice_module(fixture("refuse")).unwrap();
    assert_refused(&r, "grid_sync", "grid synchronization");
    assert_refused(&r, "cluster_rank", "clusters (`.explicitcluster`)");
    assert_refused(&r, "cluster_rank", "`%cluster_ctarank`");
    assert_refused(&r, "reads_gridid", "%gridid");
    let smid = assert_sliced(&r, "reads_smid");
    assert!(smid.notes.iter().any(|n| n.contains("%smid")), "{:?}", smid.notes);

    let e = slice_module(fixture("edge")).unwrap();
    assert_refused(&e, "sixteen_bit", "with `mov.u16`, not as a 32-bit operand");
    assert_refused(&e, "vector_read", "as a whole vector");
    assert_refused(&e, "unknown_register", "`%unknown_sreg`");
    assert_refused(&e, "indirect_call", "function pointer");
    assert_refused(&e, "calls_gridid_func", "device function `gridid_func` reads `%gridid`");
    assert_refused(&e, "too_many_params", "the driver's 4096");
    assert_sliced(&e, "calls_printf");
    // Refused kernels are left exactly as they were.
    for name in ["sixteen_bit", "vector_read", "unknown_register", "indirect_call"] {
        assert_eq!(kernel_text(&e.ptx, name), kernel_text(fixture("edge"), name));
    }
}

#[test]
fn direct_operands_and_nested_blocks_are_rewritten() {
    let e = slice_module(fixture("edge")).unwrap();
    let text = kernel_text(&e.ptx, "direct_operands");
    for line in [
        "add.u32 \t%r1, %gpuslice0, 1;",
        "cvt.u64.u32 \t%rd1, %gpuslice1;",
        "mad.lo.s32 \t%r2, %gpuslice2, %gpuslice4, %gpuslice1;",
        "setp.eq.u32 \t%q, %gpuslice0, 0;",
        "@%q mov.u32 \t%r3, %gpuslice3;",
    ] {
        assert!(text.contains(line), "direct_operands lacks {line}:\n{text}");
    }
    // The initializer and the string survive.
    assert!(e.ptx.contains(".global .align 4 .b8 table[8] = {1, 0, 0, 0, 2, 0, 0, 0};"));
    assert!(e.ptx.contains(".pragma \"nounroll\";"));
}

proptest::proptest! {
    /// Whatever a program hands the driver, the slicer answers (an error or a module) without
    /// panicking, and what it parses prints back unchanged.
    #[test]
    fn any_text_parses_or_fails_cleanly(text in "[ -~\\n\\té€]{0,300}") {
        if let Ok(m) = Module::parse(&text) {
            proptest::prop_assert_eq!(m.print(), text.clone());
        }
        let _ = slice_module(&text);
    }

    /// Fixture text cut anywhere: still no panic.
    #[test]
    fn truncated_fixtures_never_panic(cut in 0usize..8544) {
        let text = fixture("suite");
        let cut = (0..=cut.min(text.len())).rev().find(|&c| text.is_char_boundary(c)).unwrap_or(0);
        let _ = slice_module(&text[..cut]);
    }
}
