//! The writer's prepared statements, kept for its connection's life and found by the
//! address of their SQL text.
//!
//! rusqlite's statement cache finds a statement by its SQL text: every use hashes the text
//! twice (taking the statement out, putting it back), compares it in full, and moves an
//! entry of a linked hash map out and back in. For the writer's hot path (half a dozen
//! statements of 200–900 bytes per webhook) that was about 6 % of its time under load.
//! Its statements are string constants, so here a `&'static str` is its own key: the
//! shelf compares the text's address and length, never its bytes. A different text at the
//! same place cannot exist (a `'static` string is never freed), and the same text at two
//! places only means two prepared copies.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

use rusqlite::{Connection, Statement};

/// How many statements the shelf keeps; one taken beyond that is finalized after use.
const CAPACITY: usize = 64;

/// A `&'static str`'s identity: its address and length.
type Key = (usize, usize);

fn key(sql: &'static str) -> Key {
    (sql.as_ptr() as usize, sql.len())
}

/// Prepared statements of one connection (see the module doc).
pub struct StatementShelf<'c> {
    connection: &'c Connection,
    kept: RefCell<Vec<(Key, Statement<'c>)>>,
}

impl<'c> StatementShelf<'c> {
    pub fn new(connection: &'c Connection) -> StatementShelf<'c> {
        StatementShelf {
            connection,
            kept: RefCell::new(Vec::with_capacity(CAPACITY)),
        }
    }

    /// The connection the statements belong to.
    pub fn connection(&self) -> &'c Connection {
        self.connection
    }

    /// The statement for `sql`, prepared on first use; it goes back on the shelf when the
    /// returned guard is dropped. Binding every parameter on each use (as rusqlite's
    /// `execute` and `query_row` do) replaces the previous use's values, and rusqlite
    /// resets a statement after each of those calls.
    pub fn take(&self, sql: &'static str) -> rusqlite::Result<ShelvedStatement<'_, 'c>> {
        let wanted = key(sql);
        let found = {
            let mut kept = self.kept.borrow_mut();
            kept.iter()
                .position(|(key, _)| *key == wanted)
                .map(|at| kept.swap_remove(at).1)
        };
        let statement = match found {
            Some(statement) => statement,
            None => self.connection.prepare(sql)?,
        };
        Ok(ShelvedStatement {
            shelf: self,
            key: wanted,
            statement: Some(statement),
        })
    }
}

/// A statement taken from a [`StatementShelf`], put back when dropped.
pub struct ShelvedStatement<'s, 'c> {
    shelf: &'s StatementShelf<'c>,
    key: Key,
    statement: Option<Statement<'c>>,
}

impl<'c> Deref for ShelvedStatement<'_, 'c> {
    type Target = Statement<'c>;

    fn deref(&self) -> &Statement<'c> {
        self.statement
            .as_ref()
            .unwrap_or_else(|| unreachable!("a shelved statement is present until dropped"))
    }
}

impl<'c> DerefMut for ShelvedStatement<'_, 'c> {
    fn deref_mut(&mut self) -> &mut Statement<'c> {
        self.statement
            .as_mut()
            .unwrap_or_else(|| unreachable!("a shelved statement is present until dropped"))
    }
}

impl Drop for ShelvedStatement<'_, '_> {
    fn drop(&mut self) {
        let Some(statement) = self.statement.take() else {
            return;
        };
        let mut kept = self.shelf.kept.borrow_mut();
        if kept.len() < CAPACITY {
            kept.push((self.key, statement));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::params;

    const INSERT: &str = "INSERT INTO t (x) VALUES (?1)";
    const COUNT: &str = "SELECT COUNT(*), COALESCE(SUM(x), 0) FROM t WHERE x >= ?1";

    fn connection() -> Connection {
        let connection = Connection::open_in_memory().expect("open");
        connection
            .execute_batch("CREATE TABLE t (x INTEGER NOT NULL)")
            .expect("schema");
        connection
    }

    #[test]
    fn a_statement_is_prepared_once_and_reused_with_fresh_parameters() {
        let connection = connection();
        let shelf = StatementShelf::new(&connection);
        for x in 1..=5 {
            shelf
                .take(INSERT)
                .expect("take")
                .execute(params![x])
                .expect("insert");
        }
        let count = |from: i64| -> (i64, i64) {
            shelf
                .take(COUNT)
                .expect("take")
                .query_row(params![from], |row| Ok((row.get(0)?, row.get(1)?)))
                .expect("count")
        };
        assert_eq!(count(1), (5, 15));
        // The previous use's value is replaced, and the statement was reset after it.
        assert_eq!(count(4), (2, 9));
        assert_eq!(shelf.kept.borrow().len(), 2, "one kept statement per text");
    }

    #[test]
    fn two_uses_at_once_get_two_statements_and_the_shelf_stays_bounded() {
        let connection = connection();
        let shelf = StatementShelf::new(&connection);
        {
            let mut first = shelf.take(INSERT).expect("first");
            let mut second = shelf.take(INSERT).expect("second");
            first.execute(params![1]).expect("first insert");
            second.execute(params![2]).expect("second insert");
        }
        let total: i64 = connection
            .query_row("SELECT SUM(x) FROM t", [], |row| row.get(0))
            .expect("sum");
        assert_eq!(total, 3);
        let held: Vec<_> = (0..CAPACITY + 3)
            .map(|_| shelf.take(COUNT).expect("take"))
            .collect();
        drop(held);
        assert_eq!(shelf.kept.borrow().len(), CAPACITY);
    }
}
