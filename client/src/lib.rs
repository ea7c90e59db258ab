//! distbuild client (skeleton; built in a later issue).
