//! The slicing proof on the CPU: each kernel of the suite runs once over its whole grid from the
//! original PTX and again, from the sliced PTX, as the planner's launches (one block per slice, a
//! few blocks, a row, a plane, everything); the memory afterwards must be identical bit for bit.
//! The same comparison on the GPU is tests/gpu/ptxslice.sh.

mod support;

use gpuslice_ptx::{plan_slices, slice_module, Dim3};
use support::{launch, Launch, Memory, Program};

const SUITE: &str = include_str!("fixtures/suite.ptx");

enum Arg {
    Buf(Vec<u32>),
    U32(u32),
}

struct Case {
    kernel: &'static str,
    grid: Dim3,
    block: Dim3,
    dynamic_shared: u64,
    args: Vec<Arg>,
}

fn values(n: usize, seed: u32) -> Vec<u32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(1664525).wrapping_add(1013904223);
            x >> 8
        })
        .collect()
}

fn cases() -> Vec<Case> {
    let d = Dim3::new;
    let case = |kernel, grid, block, dynamic_shared, args| Case { kernel, grid, block, dynamic_shared, args };
    vec![
        case("fill_1d", d(5, 1, 1), d(4, 1, 1), 0, vec![Arg::Buf(vec![0; 20]), Arg::U32(18)]),
        case("fill_2d", d(3, 2, 1), d(2, 2, 1), 0, vec![Arg::Buf(vec![0; 24])]),
        case("fill_3d", d(2, 3, 2), d(3, 1, 1), 0, vec![Arg::Buf(vec![0; 36])]),
        case("grid_stride", d(3, 1, 1), d(4, 1, 1), 0, vec![Arg::Buf(values(50, 1)), Arg::Buf(vec![0; 50]), Arg::U32(50)]),
        case("block_sum_static", d(3, 1, 1), d(256, 1, 1), 0, vec![Arg::Buf(values(768, 2)), Arg::Buf(vec![0; 3]), Arg::Buf(vec![0; 1])]),
        case("reverse_dynamic", d(4, 1, 1), d(8, 1, 1), 32, vec![Arg::Buf(values(32, 3)), Arg::Buf(vec![0; 32])]),
        case("histogram", d(4, 1, 1), d(8, 1, 1), 0, vec![Arg::Buf(values(32, 4)), Arg::Buf(vec![0; 64]), Arg::U32(30)]),
        case("uses_helper", d(5, 1, 1), d(3, 1, 1), 0, vec![Arg::Buf(vec![0; 15])]),
        case("helper_reads_ctaid", d(5, 1, 1), d(3, 1, 1), 0, vec![Arg::Buf(vec![0; 15])]),
        case("helper_chain", d(3, 2, 1), d(4, 1, 1), 0, vec![Arg::Buf(vec![0; 24])]),
    ]
}

/// Device memory with the case's buffers laid out 256-byte aligned, and the kernel's parameters.
fn setup(case: &Case) -> (Memory, Vec<Vec<u8>>) {
    let mut mem = Vec::new();
    let mut params = Vec::new();
    for arg in &case.args {
        match arg {
            Arg::Buf(words) => {
                mem.resize(mem.len().next_multiple_of(256) + 256, 0);
                params.push((mem.len() as u64).to_le_bytes().to_vec());
                mem.extend(words.iter().flat_map(|w| w.to_le_bytes()));
            }
            Arg::U32(v) => params.push(v.to_le_bytes().to_vec()),
        }
    }
    (Memory(mem), params)
}

fn run_whole(prog: &Program, case: &Case) -> Memory {
    let (mut mem, params) = setup(case);
    launch(prog, &mut mem, &Launch { kernel: case.kernel, grid: case.grid, block: case.block, dynamic_shared: case.dynamic_shared, params });
    mem
}

/// The sliced kernel run as the planner's launches of at most `max_blocks`; `offsets` false gives
/// every launch a zero offset (what a rewrite that ignored the offset would compute).
fn run_sliced(prog: &Program, case: &Case, max_blocks: u64, offsets: bool) -> Memory {
    let (mut mem, params) = setup(case);
    for s in plan_slices(case.grid, max_blocks) {
        let mut slice = s;
        if !offsets {
            slice.offset = Dim3::new(0, 0, 0);
        }
        let mut p = params.clone();
        p.push(slice.param_bytes(case.grid).to_vec());
        launch(prog, &mut mem, &Launch { kernel: case.kernel, grid: s.grid, block: case.block, dynamic_shared: case.dynamic_shared, params: p });
    }
    mem
}

#[test]
fn sliced_launches_leave_memory_bit_identical() {
    let original = Program::load(SUITE);
    let sliced = Program::load(&slice_module(SUITE).unwrap().ptx);
    for case in cases() {
        let expected = run_whole(&original, &case);
        let (untouched, _) = setup(&case);
        assert_ne!(expected.0, untouched.0, "{}: the kernel wrote nothing", case.kernel);
        let g = case.grid;
        for max_blocks in [1, 2, 3, g.x as u64, (g.x * g.y) as u64, g.volume()] {
            let got = run_sliced(&sliced, &case, max_blocks, true);
            assert!(got.0 == expected.0, "{}: sliced by {max_blocks} blocks differs from the whole grid", case.kernel);
        }
    }
}

#[test]
fn the_comparison_catches_a_missing_offset() {
    // Sensitivity of the proof above: without the offset, block 0's work repeats and the rest is lost.
    let sliced = Program::load(&slice_module(SUITE).unwrap().ptx);
    let original = Program::load(SUITE);
    for case in cases().into_iter().filter(|c| c.kernel != "block_sum_static") {
        let expected = run_whole(&original, &case);
        assert!(run_sliced(&sliced, &case, 1, false).0 != expected.0, "{}: zero offsets went unnoticed", case.kernel);
    }
}

#[test]
fn the_original_grid_size_is_what_kernels_see() {
    // A kernel that writes gridDim computes a different answer if a slice saw its own grid size.
    // (A grid-stride loop would not show it: its result is the same for any stride.)
    let sliced = slice_module(SUITE).unwrap().ptx;
    let unsliced_nctaid = sliced.replace("ld.param.u32 \t%gpuslice5, [__gpuslice_slice+20];", "mov.u32 \t%gpuslice5, %nctaid.z;");
    assert_ne!(unsliced_nctaid, sliced);
    let prog = Program::load(&unsliced_nctaid);
    let case = cases().into_iter().find(|c| c.kernel == "fill_3d").unwrap();
    let expected = run_whole(&Program::load(SUITE), &case);
    assert!(run_sliced(&prog, &case, 1, true).0 != expected.0);
}

/// The words of buffer `index` of a case after a run.
fn buffer(case: &Case, mem: &Memory, index: usize) -> Vec<u32> {
    let (_, params) = setup(case);
    let base = u64::from_le_bytes(params[index].clone().try_into().unwrap()) as usize;
    let Arg::Buf(words) = &case.args[index] else { panic!("argument {index} is not a buffer") };
    mem.0[base..base + 4 * words.len()].chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect()
}

#[test]
fn the_interpreter_agrees_with_the_cuda_source() {
    // What suite.cu says these kernels compute, so the comparison above compares real results.
    let prog = Program::load(SUITE);
    let all = cases();
    let fill = &all[0];
    let out = buffer(fill, &run_whole(&prog, fill), 0);
    let want: Vec<u32> = (0..20u32).map(|i| if i < 18 { i.wrapping_mul(2654435761) ^ (i / 4) } else { 0 }).collect();
    assert_eq!(out, want);

    let sum = &all[4];
    let mem = run_whole(&prog, sum);
    let Arg::Buf(input) = &sum.args[0] else { unreachable!() };
    let per_block: Vec<u32> = input.chunks(256).map(|c| c.iter().fold(0u32, |a, &b| a.wrapping_add(b))).collect();
    assert_eq!(buffer(sum, &mem, 1), per_block);
    assert_eq!(buffer(sum, &mem, 2), [per_block.iter().fold(0u32, |a, &b| a.wrapping_add(b))]);

    let rev = &all[5];
    let Arg::Buf(input) = &rev.args[0] else { unreachable!() };
    let want: Vec<u32> = (0..32usize).map(|i| input[(i / 8) * 8 + 7 - i % 8].wrapping_add((i / 8) as u32)).collect();
    assert_eq!(buffer(rev, &run_whole(&prog, rev), 1), want);
}

#[test]
fn a_packed_parameter_buffer_extended_by_the_layout_gives_the_same_result() {
    // The `extra` route: the caller packs its arguments at the offsets the layout gives, the shim
    // appends the slice parameter at the reported offset, and the kernel reads each parameter back
    // from there.
    use gpuslice_ptx::params::append_to_packed;
    let outcome = slice_module(SUITE).unwrap();
    let sliced = Program::load(&outcome.ptx);
    let original = Program::load(SUITE);
    for case in cases() {
        let k = outcome.kernel(case.kernel).unwrap();
        let slot = k.slice_param.as_ref().unwrap();
        let expected = run_whole(&original, &case);
        let (mut mem, params) = setup(&case);
        let mut packed = Vec::new();
        for (p, bytes) in k.params.iter().zip(&params) {
            packed.resize(p.offset as usize, 0xAA);
            packed.extend_from_slice(bytes);
        }
        for s in plan_slices(case.grid, 3) {
            let buffer = append_to_packed(&packed, slot, &s.param_bytes(case.grid));
            let unpacked = k.params.iter().chain([slot]).map(|p| buffer[p.offset as usize..(p.offset + p.size) as usize].to_vec()).collect();
            launch(&sliced, &mut mem, &Launch { kernel: case.kernel, grid: s.grid, block: case.block, dynamic_shared: case.dynamic_shared, params: unpacked });
        }
        assert!(mem.0 == expected.0, "{}: packed route differs", case.kernel);
    }
}
