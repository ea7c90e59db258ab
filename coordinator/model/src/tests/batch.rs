//! Batches: one entry carrying the proposals of concurrent callers, each
//! applied as if it were its own entry.

use super::*;

fn submit_proposal(request: &str, n: u8) -> Proposal {
    Proposal {
        request_id: Some(format!("submit/{request}")),
        command: Command::SubmitBuild {
            request_id: request.into(),
            now_ms: 1_000,
            staged_parts: 0,
            jobs: graph(&[(n, &[])]),
            job_timeout_ms: 60_000,
        },
    }
}

#[test]
fn a_batch_applies_its_parts_in_order_each_under_its_own_index() {
    let mut model = Model::default();
    let mut requests = Requests::default();
    let batch = Proposal::once(Command::Batch {
        proposals: vec![submit_proposal("r1", 1), submit_proposal("r2", 2)],
    });
    let parts = batch.parts(7).expect("within the bound");
    assert_eq!(
        parts.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        vec![7 * MAX_BATCH as u64, 7 * MAX_BATCH as u64 + 1]
    );
    let builds: Vec<u64> = parts
        .into_iter()
        .map(|(index, p)| match requests.apply(&mut model, index, p) {
            Response::BuildSubmitted { build_id, .. } => build_id,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(builds, vec![7 * MAX_BATCH as u64, 7 * MAX_BATCH as u64 + 1]);
    model.check_invariants().expect("consistent");

    // The next entry's indexes come after every part of this one.
    let single = submit_proposal("r3", 3);
    assert_eq!(single.parts(8).unwrap()[0].0, 8 * MAX_BATCH as u64);
    // A part retried in a later batch is answered, not applied again.
    let again = Proposal::once(Command::Batch {
        proposals: vec![submit_proposal("r2", 2)],
    });
    let (index, p) = again.parts(9).unwrap()[0];
    assert_eq!(
        requests.apply(&mut model, index, p),
        Response::BuildSubmitted {
            build_id: builds[1],
            job_count: 1
        }
    );
    assert_eq!(model.builds.len(), 2);
}

#[test]
fn a_batch_over_the_bound_or_inside_a_batch_applies_nothing() {
    let over = Proposal::once(Command::Batch {
        proposals: (0..=MAX_BATCH)
            .map(|i| submit_proposal(&format!("r{i}"), 1))
            .collect(),
    });
    assert!(over.parts(1).is_none());

    let mut model = Model::default();
    let nested = Command::Batch {
        proposals: vec![submit_proposal("r1", 1)],
    };
    assert!(matches!(
        model.apply(64, &nested),
        Response::Refused { retry: false, .. }
    ));
    assert!(model.builds.is_empty());
}
