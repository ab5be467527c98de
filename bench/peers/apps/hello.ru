# The `hello` app shape for the Rack peers (puma, unicorn): any request gets `hello\n`.
# The request body, if any, is read in full first (a strict client POSTs a small body); the
# response carries its Content-Length so keep-alive works where the server supports it.
BODY = "hello\n".freeze
HEADERS = { "content-type" => "text/plain", "content-length" => BODY.bytesize.to_s }.freeze

run lambda { |env|
  env["rack.input"]&.read
  [200, HEADERS.dup, [BODY]]
}
