-- Every decision rewrites its wallet's row (balance, reserved, seq) and every batch its partition's
-- row, without changing an indexed column. Left with room in each page, PostgreSQL writes the new
-- version beside the old one (a heap-only tuple update): no index entry to add, less WAL, and the
-- dead versions are pruned as pages fill. Pages written from now on keep this room.
ALTER TABLE wallets SET (fillfactor = 70);
ALTER TABLE partitions SET (fillfactor = 50);
