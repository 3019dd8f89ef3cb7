// PreparedCheck: named prepared statements through pgdoorman with pgJDBC.
//
// Protocol patterns exercised:
//   - prepareThreshold=1: pgJDBC switches to server-side *named* statements ("S_1", "S_2", ...) from
//     the first execution, so every later execution on the same client connection sends only
//     Bind("S_n")/Execute and relies on the statement already existing on "the" server connection.
//   - Autocommit off: pgJDBC pipelines an implicit BEGIN with the first statement of each transaction
//     and ends it with an explicit commit(); the same PreparedStatement objects are reused across all
//     transactions, so a transaction pooler must re-prepare them on whichever server it lends.
//   - ps.getMetaData() / getParameterMetaData() before the first execute: a standalone
//     Parse/Describe/Sync with no Bind/Execute.
//   - addBatch()/executeBatch() of an INSERT: many Bind/Execute pairs for one statement behind a
//     single Sync; every third batch is rolled back, and the final row count checks that exactly the
//     committed batches are in table drv_java.
//
// Environment: PGHOST PGPORT PGUSER PGPASSWORD PGDATABASE, WORKERS (default 8), ITERATIONS (default 200).
// Prints one summary line; exits 1 on any error or mismatch.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.ResultSetMetaData;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.Random;
import java.util.concurrent.ConcurrentLinkedQueue;

public class PreparedCheck {
    static final int BATCH = 3;

    static String env(String name, String def) {
        String v = System.getenv(name);
        return (v == null || v.isEmpty()) ? def : v;
    }

    static Connection connect() throws SQLException {
        String url = "jdbc:postgresql://" + env("PGHOST", "127.0.0.1") + ":" + env("PGPORT", "5432") + "/"
                + env("PGDATABASE", "postgres") + "?prepareThreshold=1&sslmode=disable";
        Properties props = new Properties();
        props.setProperty("user", env("PGUSER", "postgres"));
        props.setProperty("password", env("PGPASSWORD", ""));
        return DriverManager.getConnection(url, props);
    }

    static void check(boolean ok, String what) {
        if (!ok) {
            throw new IllegalStateException(what);
        }
    }

    // One worker: its own client connection, its own rows (w = base + id), values only it can know.
    static void worker(int id, int w, int iterations) throws SQLException {
        try (Connection conn = connect()) {
            conn.setAutoCommit(false);
            PreparedStatement echo = conn.prepareStatement("SELECT ?::int AS a, ?::text AS b");
            PreparedStatement insert = conn.prepareStatement("INSERT INTO drv_java (w, i) VALUES (?, ?)");
            PreparedStatement count = conn.prepareStatement("SELECT count(*) FROM drv_java WHERE w = ?");

            // Standalone Describe before any execution.
            ResultSetMetaData md = echo.getMetaData();
            check(md != null && md.getColumnCount() == 2, "getMetaData: expected 2 columns");
            check(md.getColumnLabel(1).equals("a") && md.getColumnLabel(2).equals("b"),
                    "getMetaData: columns " + md.getColumnLabel(1) + "," + md.getColumnLabel(2));
            check(md.getColumnType(1) == java.sql.Types.INTEGER, "getMetaData: column a not INTEGER");
            check(insert.getParameterMetaData().getParameterCount() == 2, "insert: expected 2 parameters");
            conn.commit();

            long committed = 0;
            for (int i = 0; i < iterations; i++) {
                String tag = "java-" + id + "-" + i;
                echo.setInt(1, id);
                echo.setString(2, tag);
                try (ResultSet rs = echo.executeQuery()) {
                    check(rs.next(), "echo: no row");
                    int a = rs.getInt(1);
                    String b = rs.getString(2);
                    check(a == id && tag.equals(b), "echo mismatch at i=" + i + ": got (" + a + ", " + b + ")");
                    check(!rs.next(), "echo: more than one row");
                }
                for (int k = 0; k < BATCH; k++) {
                    insert.setInt(1, w);
                    insert.setInt(2, i * BATCH + k);
                    insert.addBatch();
                }
                int[] counts = insert.executeBatch();
                check(counts.length == BATCH, "executeBatch: " + counts.length + " update counts");
                for (int c : counts) {
                    check(c == 1 || c == Statement.SUCCESS_NO_INFO, "executeBatch: update count " + c);
                }
                if (i % 3 == 2) {
                    conn.rollback();
                } else {
                    conn.commit();
                    committed += BATCH;
                }
            }
            count.setInt(1, w);
            try (ResultSet rs = count.executeQuery()) {
                check(rs.next(), "count: no row");
                long n = rs.getLong(1);
                check(n == committed, "row count " + n + ", expected " + committed);
            }
            conn.commit();
        }
    }

    public static void main(String[] args) throws Exception {
        int workers = Integer.parseInt(env("WORKERS", "8"));
        int iterations = Integer.parseInt(env("ITERATIONS", "200"));
        // Rows of this run are told apart from earlier runs by a random base for w.
        int base = (new Random().nextInt(1_000_000) + 1) * 1000;

        try (Connection conn = connect(); Statement st = conn.createStatement()) {
            st.execute("CREATE TABLE IF NOT EXISTS drv_java (w int, i int)");
        }

        ConcurrentLinkedQueue<String> errors = new ConcurrentLinkedQueue<>();
        List<Thread> threads = new ArrayList<>();
        long start = System.nanoTime();
        for (int id = 0; id < workers; id++) {
            final int wid = id;
            Thread t = new Thread(() -> {
                try {
                    worker(wid, base + wid, iterations);
                } catch (Exception e) {
                    errors.add("worker " + wid + ": " + e);
                }
            });
            threads.add(t);
            t.start();
        }
        for (Thread t : threads) {
            t.join();
        }
        double elapsed = (System.nanoTime() - start) / 1e9;
        for (String e : errors) {
            System.err.println("error: " + e);
        }
        System.out.printf("PreparedCheck %s: workers=%d iterations=%d failed_workers=%d elapsed=%.1fs%n",
                errors.isEmpty() ? "OK" : "FAIL", workers, iterations, errors.size(), elapsed);
        System.exit(errors.isEmpty() ? 0 : 1);
    }
}
