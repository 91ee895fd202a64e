// The official TypeScript SDK client (@modelcontextprotocol/sdk, installed by `make install-validators`)
// against an MCP server. Not collected by pytest; run by test_external_clients.py:
//
//   node ts_sdk_check.mjs stdio -- <server argv…>
//   node ts_sdk_check.mjs http <url>
//
// Environment: SDK (the package directory), CALL (JSON {name, arguments, progress?: true}),
// READ (a resource URI), PROMPT (JSON {name, arguments}). Prints `PASS <check>` / `FAIL <check>: why`
// and `N passed, N failed`; exits 0 only if everything passed. The SDK validates every result with zod
// (tool lists, content blocks) and structuredContent against each tool's outputSchema.
import path from "node:path";

const sdk = process.env.SDK;
const load = (rel) => import(path.join(sdk, "dist", "esm", rel));
const { Client } = await load("client/index.js");
const { StdioClientTransport } = await load("client/stdio.js");
const { StreamableHTTPClientTransport } = await load("client/streamableHttp.js");

let passed = 0;
let failed = 0;
function check(name, ok, why = "") {
  if (ok) {
    passed += 1;
    console.log(`PASS ${name}`);
  } else {
    failed += 1;
    console.log(`FAIL ${name}: ${why}`);
  }
}

const [mode, ...rest] = process.argv.slice(2);
let transport;
if (mode === "stdio") {
  const argv = rest[0] === "--" ? rest.slice(1) : rest;
  transport = new StdioClientTransport({ command: argv[0], args: argv.slice(1), stderr: "ignore" });
} else {
  transport = new StreamableHTTPClientTransport(new URL(rest[0]));
}
const client = new Client({ name: "ts-sdk-check", version: "1.0.0" }, { capabilities: {} });

try {
  await client.connect(transport);
  const version = mode === "stdio" ? "stdio" : transport.protocolVersion;
  check("initialize", client.getServerVersion()?.name !== undefined, JSON.stringify(client.getServerVersion()));
  if (mode !== "stdio") check("negotiated 2025-11-25", version === "2025-11-25", String(version));

  const names = [];
  let cursor;
  do {
    const page = await client.listTools(cursor ? { cursor } : {});
    for (const tool of page.tools) {
      names.push(tool.name);
      if (tool.inputSchema?.type !== "object") check(`inputSchema of ${tool.name}`, false, "not an object");
    }
    cursor = page.nextCursor;
  } while (cursor);
  check("tools/list", names.length > 0 && new Set(names).size === names.length, JSON.stringify(names));

  if (process.env.CALL) {
    const { name, arguments: args, progress } = JSON.parse(process.env.CALL);
    const seen = [];
    const options = progress ? { onprogress: (p) => seen.push(p), resetTimeoutOnProgress: true, timeout: 120000 } : {};
    const result = await client.callTool({ name, arguments: args ?? {} }, undefined, options);
    check(`tools/call ${name}`, !result.isError, JSON.stringify(result).slice(0, 500));
    if (progress) {
      const ok = seen.length > 0 && seen.every((p, i) => i === 0 || p.progress > seen[i - 1].progress);
      check("progress", ok, JSON.stringify(seen));
      const output = seen.some((p) => typeof p.message === "string" && p.message.length > 0);
      check("progress messages", output, JSON.stringify(seen));
    }
  }

  const resources = await client.listResources();
  check("resources/list", Array.isArray(resources.resources), JSON.stringify(resources).slice(0, 300));
  const uri = process.env.READ ?? resources.resources[0]?.uri;
  if (uri) {
    const read = await client.readResource({ uri });
    check("resources/read", read.contents.length > 0, JSON.stringify(read).slice(0, 300));
  }
  const templates = await client.listResourceTemplates();
  check("resources/templates/list", Array.isArray(templates.resourceTemplates), "");
  const prompts = await client.listPrompts();
  check("prompts/list", prompts.prompts.length > 0, JSON.stringify(prompts).slice(0, 300));
  if (process.env.PROMPT) {
    const { name, arguments: args } = JSON.parse(process.env.PROMPT);
    const prompt = await client.getPrompt({ name, arguments: args ?? {} });
    check(`prompts/get ${name}`, prompt.messages.length > 0, JSON.stringify(prompt).slice(0, 300));
  }
  try {
    await client.callTool({ name: "no_such_tool_anywhere", arguments: {} });
    check("unknown tool is an error", false, "the call succeeded");
  } catch (error) {
    check("unknown tool is an error", error?.code === -32602, String(error));
  }
  if (mode !== "stdio") await transport.terminateSession();
} catch (error) {
  check("session", false, `${error?.name}: ${error?.message}`);
} finally {
  await client.close().catch(() => {});
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 && passed > 0 ? 0 : 1);
