//! distbuild worker. Built in the end-to-end issue; today it holds the
//! artifact format (`artifact`), which every transfer of job outputs uses,
//! and the content-addressed cache (`cache`).

pub mod artifact;
pub mod cache;
