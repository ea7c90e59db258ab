//! What a replica heard that times its elections (see `detector`): when a
//! leader last got through (noted by the Raft service on each accepted
//! message) and how its own latest vote round went (noted by the Raft
//! network on each vote answer).

use std::sync::Mutex;

use openraft::raft::{VoteRequest, VoteResponse};
use tokio::time::Instant;

/// How this node's own vote round of a term went, as far as its answers
/// tell (openraft keeps that to itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A voter holds a longer log: a better candidate exists, and this one
    /// cannot win until it catches up. Stand later.
    Behind,
    /// A voter voted for another candidate of the same term (a split vote)
    /// whose log and node ID rank below this one's: stand again at once, so
    /// that the better of the two wins the next term.
    Ahead,
}

/// What this node heard that times its elections: when a leader last got
/// through, and how its latest vote round went.
#[derive(Debug)]
pub struct Contact {
    heard: Mutex<Instant>,
    verdict: Mutex<Option<(u64, Verdict)>>,
}

impl Default for Contact {
    fn default() -> Self {
        Self {
            heard: Mutex::new(Instant::now()),
            verdict: Mutex::new(None),
        }
    }
}

impl Contact {
    /// Notes that a leader's message, received at `at`, was accepted.
    pub fn heard(&self, at: Instant) {
        let mut last = self.heard.lock().expect("contact lock poisoned");
        *last = (*last).max(at);
    }

    pub(super) fn last(&self) -> Instant {
        *self.heard.lock().expect("contact lock poisoned")
    }

    /// Notes a voter's `answer` to this node's `request` for its vote.
    pub fn vote_answered(&self, request: &VoteRequest<u64>, answer: &VoteResponse<u64>) {
        let term = request.vote.leader_id().term;
        let ours = (request.last_log_id, request.vote.leader_id().voted_for());
        let split_with = answer.vote.leader_id().voted_for().filter(|_| {
            !answer.vote_granted
                && !answer.vote.is_committed()
                && answer.vote.leader_id().term == term
        });
        let verdict = if answer.last_log_id > request.last_log_id {
            Verdict::Behind
        } else if let Some(rival) = split_with
            && ours > (answer.last_log_id, Some(rival))
        {
            Verdict::Ahead
        } else {
            return;
        };
        let mut slot = self.verdict.lock().expect("contact lock poisoned");
        match *slot {
            // An answer to an older round, or after one that found this
            // node behind.
            Some((noted, _)) if noted > term => {}
            Some((noted, Verdict::Behind)) if noted == term => {}
            _ => *slot = Some((term, verdict)),
        }
    }

    pub(super) fn verdict(&self, term: u64) -> Option<Verdict> {
        let slot = self.verdict.lock().expect("contact lock poisoned");
        slot.filter(|(noted, _)| *noted == term).map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use openraft::Vote;

    use super::*;

    fn log(term: u64, index: u64) -> Option<openraft::LogId<u64>> {
        Some(openraft::LogId::new(
            openraft::CommittedLeaderId::new(term, 0),
            index,
        ))
    }

    #[test]
    fn vote_answers_tell_a_candidate_whether_it_is_behind_or_ahead() {
        // Node 2 stands in term 5 with its log at 4-100.
        let request = VoteRequest::new(Vote::new(5, 2), log(4, 100));
        let answer = |vote: Vote<u64>, last: Option<openraft::LogId<u64>>, granted: bool| {
            let contact = Contact::default();
            contact.vote_answered(&request, &VoteResponse::new(vote, last, granted));
            contact.verdict(5)
        };
        // A granted vote or a plain refusal says nothing.
        assert_eq!(answer(Vote::new(5, 2), log(4, 100), true), None);
        assert_eq!(answer(Vote::new(4, 1), log(4, 100), false), None);
        // The voter's log is longer.
        assert_eq!(
            answer(Vote::new(4, 1), log(4, 102), false),
            Some(Verdict::Behind)
        );
        // Split with node 1 in term 5: 2 wins on a longer log or, on an
        // equal log, the higher node ID.
        assert_eq!(
            answer(Vote::new(5, 1), log(4, 98), false),
            Some(Verdict::Ahead)
        );
        assert_eq!(
            answer(Vote::new(5, 1), log(4, 100), false),
            Some(Verdict::Ahead)
        );
        assert_eq!(answer(Vote::new(5, 3), log(4, 100), false), None);
        // A vote already committed to a leader of the term is no split.
        let mut leader = Vote::new(5, 1);
        leader.commit();
        assert_eq!(answer(leader, log(4, 100), false), None);

        // Behind sticks for the term; a later term's verdict replaces it.
        let contact = Contact::default();
        contact.vote_answered(
            &request,
            &VoteResponse::new(Vote::new(4, 1), log(4, 102), false),
        );
        contact.vote_answered(
            &request,
            &VoteResponse::new(Vote::new(5, 1), log(4, 98), false),
        );
        assert_eq!(contact.verdict(5), Some(Verdict::Behind));
        assert_eq!(contact.verdict(6), None);
        let later = VoteRequest::new(Vote::new(6, 2), log(4, 102));
        contact.vote_answered(
            &later,
            &VoteResponse::new(Vote::new(6, 1), log(4, 102), false),
        );
        assert_eq!(contact.verdict(6), Some(Verdict::Ahead));
        // A late answer to the term-5 round changes nothing now.
        contact.vote_answered(
            &request,
            &VoteResponse::new(Vote::new(4, 1), log(4, 103), false),
        );
        assert_eq!(contact.verdict(6), Some(Verdict::Ahead));
    }
}
