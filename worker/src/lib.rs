//! distbuild worker: takes jobs from the coordinator, runs them in sandbox
//! directories, keeps their outputs in a content-addressed cache (`cache`)
//! and serves them to peers. The artifact format lives in
//! `distbuild_proto::artifact`, shared with the client.

pub mod cache;
