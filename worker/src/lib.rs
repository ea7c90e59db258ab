//! distbuild worker (skeleton; built in a later issue).
