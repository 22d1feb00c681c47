"""benchmarks/ncu_hotspots.py's attribution of stall samples to the instruction that wrote the
waiting one's sources (how session 18 found the fused backward's spilled wgmma descriptors)."""
import importlib.util
import pathlib

spec = importlib.util.spec_from_file_location(
    "ncu_hotspots", pathlib.Path(__file__).parents[1] / "benchmarks" / "ncu_hotspots.py")
hotspots = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hotspots)


def test_feeders_charge_samples_to_the_last_writer_of_a_source():
    listing = [
        "LDL.64 R216, [R1+0xa0]",              # writes R216, R217
        "IMAD R14, R13, 0x100, R16",
        "R2UR UR28, R216",                      # waits on the LDL.64
        "R2UR UR29, R217",                      # the LDL.64's second register
        "FFMA R220, R113, 0.5, -R19",
        "@!P1 MUFU.EX2 R220, R220",             # predicated; fed by the FFMA
        "HGMMA.64x64x16.F32.BF16 R152, R88, gdesc[UR8].tnspB, R152",  # writes no listed register
        "FADD R89, R89, -R152",                 # R152: no earlier writer in the listing
    ]
    samples = [0, 0, 10, 5, 0, 7, 0, 3]
    got = hotspots.feeders(listing, samples)
    assert got == {("R2UR", "LDL.64"): 15, ("MUFU.EX2", "FFMA"): 7, ("FADD", "none"): 3}


def test_registers_of_wide_loads_and_stores():
    assert hotspots.registers("LDG.E.128 R4, desc[UR4][R2.64]") == (["R4", "R5", "R6", "R7"], ["R2"])
    assert hotspots.registers("STL.64 [R1+0x50], R228") == ([], ["R1", "R228"])


def test_regions_split_where_the_executed_count_changes():
    executed = [16, 16, 1000, 1000, 990, 0, 1000, 16, 0]  # prologue, a loop (one unexecuted row), epilogue
    assert hotspots.regions(executed) == [(0, 2), (2, 7), (7, 9)]
    assert hotspots.regions([0, 0, 5]) == [(0, 3)]


def test_summary_counts_each_stall_reason_once(capsys):
    """A reason's not-issued column is a subset of its all-samples column, not a reason of its own."""
    rows = [["Address", "Source", "Warp Stall Sampling (All Samples)", "stall_wait", "stall_wait (Not Issued)",
             "stall_barrier", "stall_barrier (Not Issued)"],
            ["0x10", "FADD R1, R2, R3", "30", "30", "20", "0", "0"],
            ["0x20", "BAR.SYNC 0x0", "10", "0", "0", "10", "10"]]
    hotspots.summarise(rows, top=0, context=0)
    reasons = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("by reason"))
    assert reasons == "by reason: stall_wait 75.0%, stall_barrier 25.0%"
