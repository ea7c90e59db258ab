//! What parsing a big graph holds: a graph of trivial jobs (the shape of
//! `benches/build.rs`'s) parsed with the heap counted by this binary's
//! allocator, at its peak and once parsed. A coordinator parses every
//! submitted graph, so this is part of its memory per job at submit.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use distbuild_proto::graph::BuildGraph;

/// Counts the bytes allocated and not yet freed, and their most.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grow(bytes: usize) {
    let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every call is passed to the system allocator unchanged; the
// counters are only arithmetic beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grow(layout.size());
        // SAFETY: the caller's layout, as given.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        grow(new_size);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const JOBS: usize = 20_000;
/// Bytes per job of the parsed graph, at most: 1,311 while each template
/// kept a copy of its literal text and room for four segments.
const PARSED_BYTES: f64 = 640.0;
/// Bytes per job while parsing, at most (1,617 then).
const PEAK_BYTES: f64 = 1280.0;

fn graph_json() -> Vec<u8> {
    let jobs: Vec<String> = (0..JOBS)
        .map(|i| {
            format!(
                r#"{{"ID": "{:040x}", "Name": "job {i}", "Cmds": [{{"Exec": ["/bin/sh", "-c", "echo {i} > out"], "WorkingDirectory": "{{{{.OutputDir}}}}"}}]}}"#,
                i + 1
            )
        })
        .collect();
    format!(r#"{{"Jobs": [{}]}}"#, jobs.join(",")).into_bytes()
}

#[test]
fn parsing_a_graph_holds_little_beside_its_text() {
    let json = graph_json();
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let graph = BuildGraph::from_json(&json).expect("a valid graph");
    let parsed = LIVE.load(Ordering::Relaxed) - before;
    let peak = PEAK.load(Ordering::Relaxed) - before;
    assert_eq!(graph.jobs.len(), JOBS);
    let per_job = |bytes: usize| bytes as f64 / JOBS as f64;
    println!(
        "graph per job: {:.0} bytes of text, {:.0} bytes parsed, {:.0} bytes at the parse's peak",
        per_job(json.len()),
        per_job(parsed),
        per_job(peak)
    );
    assert!(
        per_job(parsed) <= PARSED_BYTES,
        "{:.0} bytes per job parsed",
        per_job(parsed)
    );
    assert!(
        per_job(peak) <= PEAK_BYTES,
        "{:.0} bytes per job at the peak",
        per_job(peak)
    );
}
