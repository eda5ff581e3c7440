//! Integration tests: the real server on port 0 with a temp SQLite file.

mod helpers;
