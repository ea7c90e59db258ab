//! Early cutoff: a job's cache key is made of what its dependencies
//! produced, so a dependency rebuilt into the same bytes leaves its
//! dependents cached.

use super::*;

/// A compile (job key `compile`) and a link depending on it (job key 2).
fn compile_and_link(compile: u8) -> Vec<SubmittedJob> {
    vec![job(compile, &[]), job(2, &[0])]
}

#[test]
fn a_dependency_rebuilt_into_the_same_bytes_leaves_its_dependents_cached() {
    let mut h = Harness::new();
    let b1 = h.submit("r1", compile_and_link(1));
    assert!(h.run_one("a", h.k(1), success(1)));
    let link = h.k(2);
    assert_ne!(link, key(2), "keyed by the compile's output once ready");
    assert!(h.run_one("a", link, success(2)));
    assert_eq!(h.events().last(), Some(&format!("{b1}:done:true")));

    // A new compile (its source changed) that produces the same object:
    // the link is answered from the cache.
    let b2 = h.submit("r2", compile_and_link(11));
    assert!(h.run_one("a", h.k(11), success(1)));
    assert_eq!(h.model.build(b2).expect("live").jobs[1].cache_key, link);
    assert_eq!(
        h.events(),
        [
            format!("{b2}:start:0"),
            format!("{b2}:ok:0"),
            format!("{b2}:cached:1"),
            format!("{b2}:done:true")
        ]
    );
    assert!(!h.model.has_queued());

    // One producing another object: the link runs, under another key.
    let b3 = h.submit("r3", compile_and_link(21));
    assert!(h.run_one("a", h.k(21), success(21)));
    let relink = h.model.build(b3).expect("live").jobs[1].cache_key;
    assert_ne!(relink, link);
    assert_eq!(h.pick("a"), vec![relink]);
    let spec = &h.exec_of(relink).spec;
    assert_eq!(
        spec.deps,
        [DepRef {
            job_id: id(21),
            cache_key: key(21),
            artifact: artifact(21),
        }],
        "the spec names the dependency the link reads"
    );
}

/// The output of a dependency was lost and its rebuild gave other bytes
/// (it is not deterministic): the job keyed on the old bytes must not run
/// with the new ones and file its result under the old key.
#[test]
fn a_dependency_rebuilt_into_other_bytes_fails_the_job_keyed_on_the_old_ones() {
    let mut h = Harness::new();
    // A <- B <- C; a runs A and B, then dies.
    let b = chain_whose_holder_died(&mut h, &[(1, &[]), (2, &[0]), (3, &[1])]);
    block_c_then_b(&mut h);
    assert!(h.run_one("b", h.k(1), success(1)));
    let c = h.k(3);
    // B's rebuild, keyed as before (A gave the same bytes), gives others.
    assert!(h.run_one("b", h.k(2), success(42)));
    assert!(h.events().is_empty());
    assert_eq!(h.assign("b", &[c]), vec![None]);
    let error = Harness::error_of(&h.take_events(), b, 2);
    assert!(
        error.contains("dependency \"job2\"") && error.contains("built again into different bytes"),
        "{error}"
    );
    assert!(h.model.execution(&c).is_none());
    assert!(h.model.result(&c).is_none(), "nothing filed under C's key");
    assert!(!h.model.has_queued());
}
