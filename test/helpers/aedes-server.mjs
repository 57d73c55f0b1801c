// A real Aedes broker in a process of its own (the tests start it like Mosquitto, on a free loopback port given as
// the first argument): MQTT 3.1.1 only, no shared subscriptions, sessions in memory for the life of the process.
import net from 'node:net';
import { Aedes } from 'aedes';

const port = Number(process.argv[2]);
const aedes = await Aedes.createBroker();
const server = net.createServer(aedes.handle);
server.listen(port, '127.0.0.1', () => process.stdout.write('listening\n'));
process.on('SIGTERM', () => server.close(() => aedes.close(() => process.exit(0))));
