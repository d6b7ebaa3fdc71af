"""The physical tier: base backups and continuous WAL archiving into the same store as the
logical dumps, and recovery to any point (a time, an LSN, or the newest) through a temporary
server. Dagster-free, like the rest of `backup/`. The logical dumps stay: portable, per
database; this tier is per server (cluster) and gives the one-minute RPO.

    layout.py   keys in the store, the base backup's record (base.json), WAL positions
    wal.py      `maestro wal push %p` (archive_command) and `maestro wal fetch %f %p`
                (restore_command); idempotent pushes, refused conflicts; listing, gaps;
                the server's archiving status (pg_stat_archiver)
    walkeys.py  with a backup key: the WAL key records (the data keys sealed WAL names by
                id, one a day), and the HMAC that stands for a sealed file's sha256
    spool.py    the embedded server's archive_command writes into a spool folder its OS user
                owns; a Maestro process (the pusher) moves each segment into the store
    base.py     base backups: pg_basebackup -Ft -X none -D - | zstd -> store, full or
                incremental (PostgreSQL 17+, summarize_wal), manifest kept, pg_verifybackup;
                extraction and pg_combinebackup for recovery
    recover.py  a temporary server from the newest base backup before the target plus WAL
                (served to its restore_command from the store), on a private socket; the
                point actually reached
    restore.py  restore to a point: the recovered server's databases delivered through the
                same phases as a dump's restore (scratch by default, live with --confirm)
    window.py   the recovery window (earliest and latest recoverable point) and WAL gaps,
                for `backup info`, retention and the RPO sensor

With a backup key (backup/sealing.py) every object here is sealed after zstd and every
record signed; see layout.py for what is where, and walkeys.py for the WAL's keys.
"""
