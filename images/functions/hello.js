// A JavaScript function (microvm fn deploy hello --js images/functions/hello.js), run by QuickJS.
// handle(request) gets an object: method, path, query (the raw query string), headers (lower-case names),
// body (a string). It returns { status, headers, body } (body a string, or anything JSON can encode), or a
// plain string. Module state is set once, at deploy: every request starts from a fresh copy of it.
let count = 0;

function handle(request) {
  count += 1;
  if (request.query === "fail=1") throw new Error("asked to fail");
  return {
    status: 200,
    headers: { "Content-Type": "text/plain" },
    body: "js " + request.method + " " + request.path + " " + count + " " + request.body.length,
  };
}
