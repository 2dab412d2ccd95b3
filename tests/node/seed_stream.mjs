// seeds/002 "流式输出 Node.js 请求示例", unchanged but for baseURL and apiKey.
import OpenAI from "openai";

const openai = new OpenAI({
  apiKey: process.env.DASHSCOPE_API_KEY,
  baseURL: process.env.GATEWAY_BASE_URL,
});
const completion = await openai.chat.completions.create({
  model: "qwen-plus",
  messages: [
    { role: "system", content: "You are a helpful assistant." },
    { role: "user", content: "你是谁?" },
  ],
  stream: true,
});
for await (const chunk of completion) {
  console.log(JSON.stringify(chunk));
}
