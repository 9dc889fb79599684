//! The core's connection table: every connection by key (the token its socket is registered
//! under) and the user index. The only code that knows how keys are kept: a connection that
//! changes state is replaced in place, so it keeps its key and its socket's token.

use std::io;

use slab::Slab;
use smallvec::SmallVec;

use crate::connection::{Connection, Counted, Open};
use crate::user_index::UserIndex;
use crate::UserId;

/// A user's connection keys copied out of the index, so the loop can act on each while the
/// index changes (most users have a few devices: no allocation).
pub(super) type UserKeys = SmallVec<[usize; 8]>;

/// The connections of one core and the index of their users.
pub(super) struct Table {
    /// `None` only inside [`Table::replace`], while the old state is turned into the new one:
    /// the slot stays taken, so the key cannot go to another connection meanwhile.
    slab: Slab<Option<Connection>>,
    users: UserIndex,
}

/// What [`Table::unindex`] ended, for the caller to pass on (backplane, presence).
#[derive(Debug)]
pub(super) struct Unindexed {
    /// The connection's user.
    pub user: UserId,
    /// It was the user's last connection on this core.
    pub last: bool,
    /// It was counted in the user's presence and must be uncounted.
    pub counted: bool,
    /// Its serial (the device id in Redis names it).
    pub serial: u64,
}

impl Table {
    pub fn with_capacity(capacity: usize) -> Self {
        Table {
            slab: Slab::with_capacity(capacity),
            users: UserIndex::default(),
        }
    }

    /// Connections (sockets) in the table.
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    /// Users with at least one indexed connection.
    pub fn users(&self) -> usize {
        self.users.len()
    }

    pub fn get(&self, key: usize) -> Option<&Connection> {
        self.slab.get(key).and_then(Option::as_ref)
    }

    pub fn get_mut(&mut self, key: usize) -> Option<&mut Connection> {
        self.slab.get_mut(key).and_then(Option::as_mut)
    }

    /// The connection under `key` if it is an open WebSocket.
    pub fn get_open(&self, key: usize) -> Option<&Open> {
        match self.get(key) {
            Some(Connection::Open(open)) => Some(open),
            _ => None,
        }
    }

    /// The connection under `key` if it is an open WebSocket.
    pub fn get_open_mut(&mut self, key: usize) -> Option<&mut Open> {
        match self.get_mut(key) {
            Some(Connection::Open(open)) => Some(open),
            _ => None,
        }
    }

    /// The open connection under `key` if its serial is `serial` (an answer for an earlier
    /// connection in the same slot finds none).
    pub fn get_open_serial(&self, key: usize, serial: u64) -> Option<&Open> {
        self.get_open(key).filter(|open| open.serial == serial)
    }

    /// Every key, copied (the caller may remove connections while going through them).
    pub fn keys(&self) -> Vec<usize> {
        self.slab.iter().map(|(key, _)| key).collect()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (usize, &mut Connection)> {
        self.slab
            .iter_mut()
            .filter_map(|(key, conn)| conn.as_mut().map(|conn| (key, conn)))
    }

    /// Adds the connection `make` builds for its key (it registers its socket under that key's
    /// token first); nothing is added when `make` fails.
    pub fn insert_with(
        &mut self,
        make: impl FnOnce(usize) -> io::Result<Connection>,
    ) -> io::Result<usize> {
        let entry = self.slab.vacant_entry();
        let key = entry.key();
        entry.insert(Some(make(key)?));
        Ok(key)
    }

    /// Takes the connection out of the table (the caller unindexed it).
    pub fn remove(&mut self, key: usize) -> Option<Connection> {
        self.slab.try_remove(key).flatten()
    }

    /// Moves the connection under `key` to the state `next` makes of it (which may return it
    /// unchanged); it keeps its key. `false` when there is no connection under `key`.
    pub fn replace(&mut self, key: usize, next: impl FnOnce(Connection) -> Connection) -> bool {
        let Some(slot) = self.slab.get_mut(key) else {
            return false;
        };
        let Some(conn) = slot.take() else {
            return false;
        };
        *slot = Some(next(conn));
        true
    }

    /// This core's connection keys for `user`.
    pub fn user_keys(&self, user: &str) -> UserKeys {
        SmallVec::from_slice(self.users.get(user))
    }

    /// Lists `key` under `user` (the caller marked the connection indexed). `true` when it is
    /// the user's first connection on this core.
    pub fn index(&mut self, key: usize, user: &UserId) -> bool {
        self.users.insert(user, key)
    }

    /// Takes an indexed open connection out of the user index and its presence count; `None`
    /// when it was not indexed (or is not open).
    pub fn unindex(&mut self, key: usize) -> Option<Unindexed> {
        let Some(Some(Connection::Open(open))) = self.slab.get_mut(key) else {
            return None;
        };
        if !open.indexed {
            return None;
        }
        open.indexed = false;
        let last = self.users.remove(&open.user, key);
        let counted = std::mem::replace(&mut open.counted, Counted::No) == Counted::Yes;
        Some(Unindexed {
            user: open.user.clone(),
            last,
            counted,
            serial: open.serial,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use mio::net::TcpStream;
    use tungstenite::protocol::Role;
    use tungstenite::WebSocket;

    use super::*;
    use crate::connection::{PendingRequest, Stream};

    fn socket() -> TcpStream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        tcp.set_nonblocking(true).unwrap();
        TcpStream::from_std(tcp)
    }

    fn request() -> Connection {
        Connection::Request(PendingRequest {
            stream: crate::connection::Socket::Plain(socket()),
            buf: Vec::new(),
            deadline: Instant::now(),
        })
    }

    fn upgrade(conn: Connection, user: &str, serial: u64) -> Connection {
        let Connection::Request(pending) = conn else {
            return conn;
        };
        let ws = WebSocket::from_raw_socket(Stream::new(pending.stream), Role::Server, None);
        let user = UserId::from(user);
        let open = Open::new(
            ws,
            Some(user),
            Instant::now(),
            Duration::from_secs(1),
            serial,
            10,
            None,
        );
        Connection::Open(open)
    }

    #[test]
    fn replace_keeps_the_key() {
        let mut table = Table::with_capacity(4);
        let a = table.insert_with(|_| Ok(request())).unwrap();
        let b = table.insert_with(|_| Ok(request())).unwrap();
        table.remove(a);
        let c = table.insert_with(|_| Ok(request())).unwrap();
        assert!(table.replace(b, |conn| upgrade(conn, "u", 7)));
        assert_eq!(table.get_open(b).map(|o| o.serial), Some(7));
        assert!(table.get_open(c).is_none(), "a request is not open");
        // Whatever else comes and goes, the replaced connection stays under its key.
        let d = table.insert_with(|_| Ok(request())).unwrap();
        table.remove(c);
        assert!(table.replace(b, |conn| conn));
        assert_eq!(table.get_open(b).map(|o| o.serial), Some(7));
        assert!(table.get_open_serial(b, 8).is_none());
        assert_eq!(table.keys().len(), 2);
        assert!(table.get(d).is_some());
        assert!(
            !table.replace(c, |conn| conn),
            "no connection under a removed key"
        );
    }

    #[test]
    fn insert_with_adds_nothing_when_make_fails() {
        let mut table = Table::with_capacity(4);
        let failed = table.insert_with(|_| Err(io::ErrorKind::Other.into()));
        assert!(failed.is_err());
        assert!(table.is_empty());
    }

    #[test]
    fn index_and_unindex_by_user() {
        let mut table = Table::with_capacity(4);
        let a = table
            .insert_with(|_| Ok(upgrade(request(), "u", 1)))
            .unwrap();
        let b = table
            .insert_with(|_| Ok(upgrade(request(), "u", 2)))
            .unwrap();
        let user = UserId::from("u");
        assert!(table.index(a, &user));
        assert!(!table.index(b, &user));
        assert_eq!(table.user_keys("u").as_slice(), &[a, b]);
        assert_eq!(table.users(), 1);
        table.get_open_mut(b).unwrap().counted = Counted::Yes;
        let first = table.unindex(a).unwrap();
        assert!(!first.last && !first.counted);
        assert!(table.unindex(a).is_none(), "already unindexed");
        let second = table.unindex(b).unwrap();
        assert!(second.last && second.counted);
        assert_eq!(table.get_open(b).unwrap().counted, Counted::No);
        assert!(table.user_keys("u").is_empty());
        assert_eq!(table.users(), 0);
    }

    #[test]
    fn a_slot_costs_no_more_than_a_connection() {
        assert_eq!(
            std::mem::size_of::<Option<Connection>>(),
            std::mem::size_of::<Connection>()
        );
    }

    #[test]
    fn get_open_on_other_states_is_none() {
        let mut table = Table::with_capacity(4);
        let key = table.insert_with(|_| Ok(request())).unwrap();
        assert!(table.get(key).is_some());
        assert!(table.get_open(key).is_none());
        assert!(table.get_open_mut(key).is_none());
        assert!(table.unindex(key).is_none());
        assert!(table.get_open(key + 1).is_none());
        assert!(table.remove(key).is_some());
        assert!(table.remove(key).is_none());
    }
}
