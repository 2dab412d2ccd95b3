// seeds/002 "Node.js 请求示例" (text input), unchanged but for baseURL and apiKey.
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
});
console.log(JSON.stringify(completion));
