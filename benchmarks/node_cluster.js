// Node's cluster, the classic example: the primary forks one worker per
// CPU (or $BENCH_WORKERS) and each worker calls http.createServer().listen().
// Scheduling is Node's default (SCHED_RR on Linux) unless the environment
// sets NODE_CLUSTER_SCHED_POLICY=none.
//
// Same surface as benchmarks/app.tac: $BENCH_HTTP_PORT answers "hello\n"
// with an X-Worker: <pid> header, $BENCH_FLOOD_PORT closes every connection
// at once.  Each worker counts the connections it got; the primary serves
// GET /stats on $BENCH_STATS_PORT (asking every worker over the cluster
// IPC channel, so it costs nothing while the load runs).  The primary
// prints "ready" once every worker listens on both ports.
'use strict';
const cluster = require('cluster');
const http = require('http');
const net = require('net');
const os = require('os');

const HTTP_PORT = Number(process.env.BENCH_HTTP_PORT || 8080);
const FLOOD_PORT = Number(process.env.BENCH_FLOOD_PORT || 8081);
const STATS_PORT = Number(process.env.BENCH_STATS_PORT || 8082);
const WORKERS = Number(process.env.BENCH_WORKERS || os.availableParallelism());
const HOST = '127.0.0.1';

if (cluster.isPrimary) {
  let listening = 0;
  for (let i = 0; i < WORKERS; i++) cluster.fork();
  cluster.on('listening', () => {
    listening += 1;
    if (listening === 2 * WORKERS) console.log('ready');
  });
  cluster.on('exit', (worker, code, signal) => {
    console.log(`worker ${worker.process.pid} exited (${signal || code})`);
  });

  let nextQuery = 0;
  http.createServer((req, res) => {
    const id = ++nextQuery;
    const workers = Object.values(cluster.workers);
    const answers = [];
    const done = () => {
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify(answers));
    };
    const timer = setTimeout(done, 2000);
    for (const w of workers) {
      const onMessage = (msg) => {
        if (!msg || msg.stats !== id) return;
        w.removeListener('message', onMessage);
        answers.push(msg.counts);
        if (answers.length === workers.length) {
          clearTimeout(timer);
          done();
        }
      };
      w.on('message', onMessage);
      w.send({ query: id });
    }
  }).listen(STATS_PORT, HOST);

  const stop = () => {
    for (const w of Object.values(cluster.workers)) w.kill('SIGTERM');
    setTimeout(() => process.exit(0), 200).unref();
    cluster.on('exit', () => {
      if (Object.keys(cluster.workers).length === 0) process.exit(0);
    });
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
} else {
  const counts = { pid: process.pid, http: 0, flood: 0, open: 0, requests: 0 };
  const pid = String(process.pid);

  const server = http.createServer((req, res) => {
    counts.requests += 1;
    const answer = () => {
      res.setHeader('Content-Type', 'text/plain');
      res.setHeader('X-Worker', pid);
      res.end('hello\n');
    };
    if (req.url.startsWith('/slow')) setTimeout(answer, 50 + Math.random() * 150);
    else answer();
  });
  server.on('connection', (socket) => {
    counts.http += 1;
    counts.open += 1;
    socket.on('close', () => { counts.open -= 1; });
  });
  server.listen(HTTP_PORT, HOST);

  net.createServer((socket) => {
    counts.flood += 1;
    socket.destroy();
  }).listen(FLOOD_PORT, HOST);

  process.on('message', (msg) => {
    if (msg && msg.query) process.send({ stats: msg.query, counts });
  });
}
