//! distbuild simulation (skeleton; built in a later issue).
